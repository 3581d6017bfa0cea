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


# --- fracgen/s3.py in this process, each value and message exact (issue 39) ---------------------------------------

def test_an_s3_spec_is_a_bucket_and_a_folder_prefix():
    from fracgen.errors import FracgenError
    from fracgen.s3 import parse

    assert parse("s3://bucket") == ("bucket", "")
    assert parse("s3://my.bucket-1/a") == ("my.bucket-1", "a/")
    assert parse("s3://bucket/a/b/") == ("bucket", "a/b/")
    with pytest.raises(FracgenError) as refused:
        parse("s3://Bad_Name/x")
    assert str(refused.value) == ("'s3://Bad_Name/x' is not s3://BUCKET/PREFIX/ (a bucket name: 3-63 lower-case "
                                  "letters, digits, '.' and '-')")


def test_without_boto3_s3_is_one_line_naming_the_extra(monkeypatch):
    import sys

    from fracgen.errors import FracgenError
    from fracgen.s3 import _boto3

    monkeypatch.setitem(sys.modules, "boto3", None)  # a capability faked absent: import fails
    with pytest.raises(FracgenError) as refused:
        _boto3()
    assert str(refused.value) == "s3:// needs boto3: pip install 'fracgen[s3]' (or boto3)"


@pytest.mark.parametrize(("endpoint", "fine"), [
    ("http://127.0.0.1:9000", True), ("https://s3.example.org", True), ("http://h:1", True), ("http://h:0", False),
    ("HTTPS://h", True), ("ftp://h", False), ("http://", False), ("http://[::1", False), ("http://h:99999", False),
    ("http://h/ x", False), ("http://h/\x1b", False),
])
def test_an_endpoint_is_an_http_url_of_a_host_or_one_line_naming_its_variable(endpoint, fine):
    from fracgen.errors import FracgenError
    from fracgen.s3 import _check_endpoint

    if fine:
        _check_endpoint("AWS_ENDPOINT_URL", endpoint)
        return
    with pytest.raises(FracgenError) as refused:
        _check_endpoint("AWS_ENDPOINT_URL_S3", endpoint)
    assert str(refused.value).startswith("AWS_ENDPOINT_URL_S3 '")
    assert str(refused.value).endswith("' is not the http(s) URL of an S3 endpoint (like http://127.0.0.1:9000): "
                                       "correct it, or unset it for AWS itself")


def test_an_s3_error_document_is_said_in_a_few_words_from_its_first_4096_bytes():
    from fracgen.s3 import error_hint

    assert error_hint(b"<Error><Code>NoSuchKey</Code></Error>") == "no such object"
    assert error_hint(b"<Error><Code>SlowDown</Code></Error>") == "SlowDown"  # one we do not know: its code
    assert error_hint(b"<html>bad gateway</html>") == ""
    tag = b"<Code>NoSuchKey</Code>"
    assert error_hint(b" " * (4096 - len(tag)) + tag) == "no such object"
    assert error_hint(b" " * (4097 - len(tag)) + tag) == ""  # one byte past the bound: not read


def test_a_signed_url_lasts_an_hour_and_names_no_secret(aws):
    from fracgen import s3

    url = s3.presign(BUCKET, "sets/a/manifest.json")
    assert f"/{BUCKET}/sets/a/manifest.json?" in url and "X-Amz-Expires=3600" in url
    assert SECRET not in url


def test_a_signing_refusal_names_the_object_in_at_most_200_characters(aws, monkeypatch):
    import botocore.exceptions

    from fracgen import s3
    from fracgen.errors import FracgenError

    error = botocore.exceptions.ParamValidationError(report="no " * 200)

    def refuse(*a, **kw):
        raise error

    monkeypatch.setattr(type(s3.client()), "generate_presigned_url", refuse)
    with pytest.raises(FracgenError) as refused:
        s3.presign(BUCKET, "k")
    from fracgen.untrusted import printable

    assert len(printable(error)) > 200
    assert str(refused.value) == f"s3://{BUCKET}/k: " + printable(error)[:200]


def test_upload_puts_the_files_in_order_says_each_and_returns_the_folder(aws, tmp_path):
    for name in ("a.tar", "manifest.json"):
        (tmp_path / name).write_text(name)
    notes = []
    from fracgen import s3

    assert s3.upload(tmp_path, ["a.tar", "manifest.json"], f"s3://{BUCKET}/up/x", note=notes.append) == \
        f"s3://{BUCKET}/up/x/"
    assert notes == [f"uploaded s3://{BUCKET}/up/x/a.tar", f"uploaded s3://{BUCKET}/up/x/manifest.json"]
    assert aws.get_object(Bucket=BUCKET, Key="up/x/manifest.json")["Body"].read() == b"manifest.json"


def test_an_upload_refused_is_one_line_with_the_stores_reason_or_the_errors_first_200_characters(aws, tmp_path,
                                                                                                 monkeypatch):
    from fracgen import s3
    from fracgen.errors import FracgenError

    (tmp_path / "a.tar").write_text("a")
    with pytest.raises(FracgenError) as refused:
        s3.upload(tmp_path, ["a.tar"], "s3://no-such-bucket-here/p/")
    assert str(refused.value) == "upload of s3://no-such-bucket-here/p/a.tar failed: no such bucket"
    missing = "m" * 240
    with pytest.raises(FracgenError) as refused:
        s3.upload(tmp_path, [missing], f"s3://{BUCKET}/p/")
    reason = str(refused.value).removeprefix(f"upload of s3://{BUCKET}/p/{missing} failed: ")
    assert len(reason) == 200 and "No such file or directory" in reason

    def fails(*a, **kw):
        raise RuntimeError("")

    monkeypatch.setattr(type(s3.client()), "upload_file", fails)
    with pytest.raises(FracgenError) as refused:
        s3.upload(tmp_path, ["a.tar"], f"s3://{BUCKET}/p/")
    assert str(refused.value) == f"upload of s3://{BUCKET}/p/a.tar failed: RuntimeError"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(FracgenError, match=rf"^s3://{BUCKET}/q/: no AWS credentials found"):
        s3.upload(tmp_path, ["a.tar"], f"s3://{BUCKET}/q/")


def test_missing_or_unknown_credentials_are_one_line_naming_what_was_asked_for(aws, monkeypatch):
    from fracgen import s3
    from fracgen.errors import FracgenError

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(FracgenError) as refused:
        s3.presign(BUCKET, "sets/a/manifest.json")
    assert str(refused.value) == (f"s3://{BUCKET}/sets/a/manifest.json: no AWS credentials found (set "
                                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or write "
                                  "~/.aws/credentials)")
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    with pytest.raises(FracgenError) as refused:
        s3.check_credentials("s3://b/k")
    assert str(refused.value) == "s3://b/k: The config profile (nobody) could not be found"
