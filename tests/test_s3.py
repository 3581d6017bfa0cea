"""Issue 28, object storage: s3:// through boto3 against a real S3 API on loopback (moto's server, started and
stopped here): publish a data set and weights, pull them, train and fine-tune from them; every error one line, no
credential or signature ever shown."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from helpers import Server, train_cli
from typer.testing import CliRunner

from fracgen.cli import app as fracgen_app
from fracgen.dataset import render_dataset

pytest.importorskip("boto3", reason="boto3 is not installed (pip install fracgen[s3])")
moto_server = pytest.importorskip("moto.server", reason="moto is not installed (the test extra)")

SECRET = "s3cretKeyThatMustNeverShow"
BUCKET = "fracgen-test"
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--batch", "16", "--eval-every", "0",
        "--eval-samples", "8"]


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{server._server.server_port}"
    server.stop()


@pytest.fixture
def aws(endpoint, monkeypatch, tmp_path):
    """The standard AWS environment, pointed at the loopback store; no credential file or instance role is read."""
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIATESTING",
                       "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                       "AWS_CONFIG_FILE": str(tmp_path / "none"), "XDG_CACHE_HOME": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from fracgen import s3

    client = s3.client()
    if BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=BUCKET)
    return client


def _fracgen(*args):
    return CliRunner().invoke(fracgen_app, [str(a) for a in args])


def _one_line(result, match: str) -> None:
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("note:")]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert match in lines[0], result.output


def _never_shown(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and "X-Amz-Signature" not in text and "X-Amz-Credential" not in text


def test_a_data_set_and_weights_go_to_s3_and_come_back_checked(aws, tmp_path, capsys):
    folder = tmp_path / "set"
    render_dataset(folder, classes=8, size=32, points=3000, shard_size=8, seed=0, workers=1)
    published = _fracgen("publish", folder, "--to", f"s3://{BUCKET}/sets/a/")
    assert published.exit_code == 0 and f"uploaded to s3://{BUCKET}/sets/a/" in published.output, published.output
    keys = [o["Key"] for o in aws.list_objects_v2(Bucket=BUCKET, Prefix="sets/a/")["Contents"]]
    assert {"sets/a/manifest.json", "sets/a/SHA256SUMS", "sets/a/README.md"} <= set(keys)

    pulled = _fracgen("pull", f"s3://{BUCKET}/sets/a/", tmp_path / "pulled")
    assert pulled.exit_code == 0, pulled.output
    for shard in json.loads((folder / "manifest.json").read_text())["shards"]:
        assert (tmp_path / "pulled" / shard["file"]).read_bytes() == (folder / shard["file"]).read_bytes()
    source = json.loads((tmp_path / "pulled" / "source.json").read_text())
    assert source["url"] == f"s3://{BUCKET}/sets/a/manifest.json"
    assert _fracgen("verify", tmp_path / "pulled").exit_code == 0

    from train import pretrain, publish

    code, out, err = train_cli(pretrain.app, ["--shards", f"s3://{BUCKET}/sets/a/", "--out", tmp_path / "run",
                                              "--steps", "2", *TINY], capsys)
    assert code == 0 and "shards: pulled" in out, err
    publish.publish(tmp_path / "run", to=f"s3://{BUCKET}/models/tiny/")
    from train import finetune

    code, out2, err2 = train_cli(finetune.app, ["--checkpoint", f"s3://{BUCKET}/models/tiny/", "--steps", "1",
                                                "--seeds", "0"], capsys)
    assert code == 0 and "checkpoint: fetched config.json, model.safetensors" in out2, err2
    _never_shown(published.output, pulled.output, out, err, out2, err2,
                 (tmp_path / "pulled" / "source.json").read_text())


def test_s3_errors_are_one_line_and_nothing_is_kept(aws, tmp_path, monkeypatch):
    folder = tmp_path / "set"
    render_dataset(folder, classes=8, size=32, points=3000, shard_size=8, seed=1, workers=1)
    assert _fracgen("publish", folder, "--to", f"s3://{BUCKET}/sets/b/").exit_code == 0

    _one_line(_fracgen("pull", "s3://no-such-bucket-here/x/", tmp_path / "p1"), "(no such bucket)")
    _one_line(_fracgen("pull", f"s3://{BUCKET}/sets/missing/", tmp_path / "p2"), "(no such object)")
    _one_line(_fracgen("pull", "s3://UPPER_case/x/", tmp_path / "p3"), "is not s3://BUCKET/PREFIX/")

    manifest = json.loads((folder / "manifest.json").read_text())
    shard = manifest["shards"][0]["file"]
    changed = bytearray((folder / shard).read_bytes())
    changed[len(changed) // 2] ^= 1
    aws.put_object(Bucket=BUCKET, Key=f"sets/b/{shard}", Body=bytes(changed))  # the object changed after publishing
    result = _fracgen("pull", f"s3://{BUCKET}/sets/b/", tmp_path / "p4")
    _one_line(result, f"s3://{BUCKET}/sets/b/{shard} does not match the sha256 in the manifest")
    assert not (tmp_path / "p4" / shard).exists() and not list((tmp_path / "p4").glob(".*.tmp"))

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = _fracgen("pull", f"s3://{BUCKET}/sets/b/", tmp_path / "p5")
    _one_line(result, "no AWS credentials found")
    _one_line(_fracgen("publish", folder, "--to", f"s3://{BUCKET}/sets/c/"), "no AWS credentials found")
    assert not (folder / "README.md").read_text() == ""  # refused before any work: the card from before is there
    _never_shown(result.output)


def test_a_store_that_denies_access_is_one_line(aws, tmp_path, monkeypatch):
    """Signed GETs against a loopback store that refuses them the way S3 does (403, an <Error> document)."""
    def denied(handler):
        body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        handler.send_response(403)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with Server(tmp_path, routes={f"/{BUCKET}/private/manifest.json": denied}) as store:
        monkeypatch.setenv("AWS_ENDPOINT_URL", store.url.rstrip("/"))
        result = _fracgen("pull", f"s3://{BUCKET}/private/", tmp_path / "p")
        assert store.requests == [f"/{BUCKET}/private/manifest.json"]
    _one_line(result, "HTTP 403 Forbidden (access denied: the AWS credentials do not allow it)")
    _never_shown(result.output)


def test_an_unreachable_endpoint_is_one_line_in_time(aws, tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    result = _fracgen("pull", f"s3://{BUCKET}/sets/a/", tmp_path / "p", "--deadline", "3")
    _one_line(result, "Connection refused")
    assert not Path(tmp_path / "p").exists()
