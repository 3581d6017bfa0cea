"""Issue 38, round 4 of reliability and security: fracgen.torch holds every image and shard to the manifest (a small
PNG claiming 12000 x 12000 px, a sparse shard of a terabyte, shards that cannot be dealt evenly over DDP ranks),
`fracgen verify` reads the dataset card as `datasets` does, and an invalid AWS_ENDPOINT_URL, junk from a fake Dask
scheduler and a manifest claiming 16384 px each end in one line. Real components throughout: shards written by
fracgen's writer, Pillow, torch's DataLoader workers and gloo on loopback, boto3, dask's own client, a subprocess's
real stderr."""

from __future__ import annotations

import json
import multiprocessing
import re
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fracgen import png
from fracgen.cli import app
from fracgen.dataset import manifest_text, render_dataset, verify_dataset
from fracgen.errors import FracgenError
from fracgen.shards import Sample, iter_samples, shard_in_memory

ROOT = Path(__file__).resolve().parents[1]


def fracgen(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, match: str) -> str:
    lines = [line for line in result.output.strip().splitlines()
             if line.strip() and not line.startswith("note:") and "━" not in line]  # verify's bar ends in a line
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert match in lines[0] and "Traceback" not in result.output, result.output
    return lines[0]


# --- 9. fracgen.torch ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder512(tmp_path_factory) -> Path:
    """4 shards of 2 samples at 512 px: a sample may take ~270 KB, so a 140 KB PNG fits the manifest's bounds."""
    out = tmp_path_factory.mktemp("torch") / "set"
    render_dataset(out, classes=4, per_class=2, size=512, points=20_000, fill=0.01, shard_size=2, seed=0,
                   workers=1)
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _replace_png(folder: Path, shard: int, position: int, data: bytes) -> str:
    """Sample `position` of shard `shard` given the PNG `data`, the shard written again by fracgen's writer and the
    manifest made to record it: a self-consistent folder whose sha256s all match."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][shard]
    samples = [Sample(key, parts["png"], int(parts["cls"]), json.loads(parts["json"]))
               for key, parts in iter_samples(folder / entry["file"])]
    samples[position] = Sample(samples[position].key, data, samples[position].label, samples[position].meta)
    raw, manifest["shards"][shard] = shard_in_memory(entry["file"], samples)
    (folder / entry["file"]).write_bytes(raw)
    (folder / "manifest.json").write_text(manifest_text(manifest))
    return samples[position].key


def _huge_png(side: int) -> bytes:
    """An all-black side x side grey PNG deflated at zlib's best: 12000 px in ~140 KB, 144 MB once decoded."""
    deflate, row = zlib.compressobj(9), bytes(side + 1)
    idat = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return png.SIGNATURE + png._chunk(b"IHDR", header) + png._chunk(b"IDAT", idat) + png._chunk(b"IEND", b"")


def test_fracgen_torch_refuses_an_image_other_than_the_manifests_before_decoding_it(folder512, tmp_path):
    from fracgen.torch import ShardDataset, ShardStream

    bomb = _huge_png(12000)
    assert len(bomb) < 200_000
    folder = _copy(folder512, tmp_path / "bomb")
    key = _replace_png(folder, 1, 0, bomb)  # sample 2
    assert verify_dataset(folder)  # verify refuses it too (png.decode with the manifest's size)
    ds = ShardDataset(folder)  # every sha256 matches: the index is built
    assert ds[0][0].size == (512, 512)
    t0 = time.monotonic()
    with pytest.raises(FracgenError, match=r"sample 2 is a 12000x12000 px 8-bit grey PNG, not the manifest's "
                                           r"512x512 px 8-bit grey\): check the folder with `fracgen verify"):
        ds[2]
    with pytest.raises(FracgenError, match=f"sample '{key}' is a 12000x12000 px"):
        list(ShardStream(folder))
    assert time.monotonic() - t0 < 1.0  # refused from the header: 144 MB were never inflated

    rgb = _copy(folder512, tmp_path / "rgb")
    out = __import__("io").BytesIO()
    Image.new("RGB", (512, 512), (0, 127, 0)).save(out, format="PNG")
    _replace_png(rgb, 0, 1, out.getvalue())
    with pytest.raises(FracgenError, match=r"sample 1 is a 512x512 px 8-bit RGB PNG, not the manifest's 512x512 px "
                                           r"8-bit grey"):
        ShardDataset(rgb)[1]
    jpeg = _copy(folder512, tmp_path / "jpeg")
    out = __import__("io").BytesIO()
    Image.new("L", (512, 512)).save(out, format="JPEG")
    _replace_png(jpeg, 0, 0, out.getvalue())
    with pytest.raises(FracgenError, match=r"sample 0: not a PNG"):
        ShardDataset(jpeg)[0]


def test_fracgen_torch_compares_a_shards_size_before_reading_it(folder512, tmp_path):
    from fracgen.torch import ShardDataset, ShardStream

    folder = _copy(folder512, tmp_path / "sparse")
    shard = sorted(folder.glob("*.tar"))[2]
    with open(shard, "r+b") as f:
        f.truncate(1 << 40)  # a sparse terabyte: reading it whole is a MemoryError
    t0 = time.monotonic()
    with pytest.raises(FracgenError, match=f"shard {shard} does not match its manifest \\(size: 1,099,511,627,776 "
                                           "bytes, the manifest says [0-9,]+\\): check the folder with `fracgen "
                                           "verify"):
        ShardDataset(folder)
    assert time.monotonic() - t0 < 5

    grown = _copy(folder512, tmp_path / "grown")
    first = sorted(grown.glob("*.tar"))[0]
    first.write_bytes(first.read_bytes() + bytes(10240))
    stream = iter(ShardStream(grown))
    with pytest.raises(FracgenError, match=r"\(size: [0-9,]+ bytes, the manifest says"):
        next(stream)  # before any sample of the shard is handed out


def _shard_of(folder: Path, shard: int, keep: int) -> None:
    """Shard `shard` written again with only its first `keep` samples, its manifest entry given the new bytes and
    sha256 but still the sample count its settings put there."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][shard]
    samples = [Sample(key, parts["png"], int(parts["cls"]), json.loads(parts["json"]))
               for key, parts in iter_samples(folder / entry["file"])][:keep]
    raw, written = shard_in_memory(entry["file"], samples)
    entry.update(bytes=written["bytes"], sha256=written["sha256"])
    (folder / entry["file"]).write_bytes(raw)
    (folder / "manifest.json").write_text(manifest_text(manifest))


def test_a_shard_holding_fewer_samples_than_its_manifest_says_stops_the_stream(folder512, tmp_path):
    """Its sha256 matches (the manifest lists any bytes' hash): the stream counted nothing and handed out one sample
    short; with equal=True an empty shard would have been read round and round."""
    import threading

    from fracgen.torch import ShardStream

    short = _copy(folder512, tmp_path / "short")
    _shard_of(short, 3, 1)
    with pytest.raises(FracgenError, match=r"\(1 sample, the manifest says 2\)"):
        list(ShardStream(short))
    empty = _copy(folder512, tmp_path / "empty")
    _shard_of(empty, 0, 0)
    box = {}

    def read():
        try:
            list(ShardStream(empty, equal=True))
        except FracgenError as e:
            box["error"] = str(e)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(20)
    assert "(0 samples, the manifest says 2)" in box.get("error", ""), box


def _rank(rank: int, port: int, folder: str, equal: bool, results) -> None:
    """One DDP rank of three (gloo on loopback): how many samples its DataLoader (2 workers) yields, or its error."""
    import torch.distributed as dist

    from fracgen.torch import ShardStream

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    try:
        stream = ShardStream(folder, equal=True) if equal else ShardStream(folder)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        try:
            results.put((rank, sorted(label for _, label in loader)))
        except FracgenError as e:
            results.put((rank, str(e)))
    except Exception as e:  # reported, not a hung queue
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


def _ranks(folder: Path, equal: bool) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, port, str(folder), equal, results)) for r in range(3)]
    for p in ranks:
        p.start()
    got = dict(results.get(timeout=120) for _ in ranks)
    for p in ranks:
        p.join(30)
    return got


def test_shard_stream_over_more_ranks_and_workers_than_shards_is_an_error_or_equal_lengths(folder512):
    """3 ranks x 2 workers over 4 shards: dealt as they were, ranks 0 and 1 got 4 samples and rank 2 none, and a
    DDP loop waited forever for it. Now every rank stops at once with the counts, or reads the same number."""
    uneven = _ranks(folder512, equal=False)
    for rank in range(3):
        message = uneven[rank]
        assert isinstance(message, str), message
        line = message.splitlines()[-1]  # a DataLoader worker's error comes with its traceback; ours is the end
        assert ("4 shards (8 samples) do not deal out evenly over 3 ranks x 2 DataLoader workers: the ranks would "
                "get 4, 4, 0 samples (each worker 0 to 2)") in line and "equal=True" in line, line
    equal = _ranks(folder512, equal=True)
    labels = [i % 4 for i in range(8)]
    assert all(len(equal[rank]) == 4 for rank in range(3)), equal  # ceil(8 / 6) = 2 a worker
    assert sorted(set().union(*(set(v) for v in equal.values()))) == sorted(set(labels))
    assert sorted(equal[0] + equal[1]) == sorted(labels)  # the first four slots read each shard once


# --- 12. the dataset card ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "set"
    render_dataset(out, classes=8, size=32, points=2000, shard_size=4, seed=0, workers=1)
    result = fracgen("publish", out)
    assert result.exit_code == 0, result.output
    return out


def _with_card(published: Path, tmp_path: Path, old: str, new: str) -> Path:
    folder = _copy(published, tmp_path / "set")
    card = (folder / "README.md").read_text()
    assert old in card
    (folder / "README.md").write_text(card.replace(old, new))
    return folder


PATH_LINE = '    path: "1p-frac-*.tar"'


@pytest.mark.parametrize("path", ["../other/1p-frac-*.tar", "/srv/elsewhere/*.tar", "https://host/x/1p-frac-000000.tar",
                                  "hf://datasets/org/name/*.tar", "~/1p-frac-*.tar", "sub/../../1p-frac-*.tar",
                                  "C:\\\\data\\\\x.tar"])
def test_verify_refuses_a_card_whose_data_files_leave_the_folder(published, tmp_path, path):
    assert fracgen("verify", published).exit_code == 0
    folder = _with_card(published, tmp_path, PATH_LINE, f'    path: "{path}"')
    shown = path.replace("\\\\", "\\")
    line = one_line_error(fracgen("verify", folder), f"README.md (dataset card): its data_files path '{shown}' "
                                                     "is outside the folder")
    assert "`fracgen publish` writes it again" in line
    assert any("README.md" in p for p in verify_dataset(folder))


@pytest.mark.parametrize(("old", "new", "says"), [
    (PATH_LINE, '    path: "*.tar"', "its data_files path '*.tar' is not the shards' '1p-frac-*.tar'"),
    (PATH_LINE, '    path: ["1p-frac-*.tar", "../x/*.tar"]', "its data_files path '../x/*.tar' is outside the folder"),
    ("  data_files:", "  data_dir: ..\n  data_files:", "its data_dir '..' is outside the folder"),
    ("- config_name: default", "- config_name: default\n  data_files: ../x.tar\n- config_name: other",
     "its data_files path '../x.tar' is outside the folder"),
    ("configs:", "configs: &a\n- *a\nx:", "its configs are not the ones `fracgen publish` writes"),
    ("license:", "license: [unclosed\n", "its front matter is not YAML"),
    ("configs:", "\n".join([f"l0: &l0 [{', '.join(['ha'] * 10)}]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]) + "\nconfigs: [{config_name: "
     "default, data_files: [{split: train, path: *l9}, *l9]}]\nx:", "its configs are not the ones `fracgen publish`"),
])
def test_verify_holds_the_cards_configs_to_the_ones_publish_writes(published, tmp_path, old, new, says):
    folder = _with_card(published, tmp_path, old, new)
    t0 = time.monotonic()
    one_line_error(fracgen("verify", folder), f"README.md (dataset card): {says}")
    assert time.monotonic() - t0 < 10  # 10^10 'ha's through YAML aliases are never walked


def test_a_card_datasets_overrides_is_refused_and_publish_repairs_a_bad_card(published, tmp_path):
    folder = _with_card(published, tmp_path, "pretty_name:", "pretty_name: edited by hand\nold_pretty_name:")
    assert fracgen("verify", folder).exit_code == 0  # the card's prose and other keys are the owner's to edit
    (folder / ".huggingface.yaml").write_text("configs:\n- config_name: default\n  data_files: /srv/x/*.tar\n")
    one_line_error(fracgen("verify", folder), ".huggingface.yaml: `datasets` reads its configs over the card's")
    (folder / ".huggingface.yaml").unlink()
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace(PATH_LINE, '    path: "../../etc/*"'))
    assert fracgen("verify", folder).exit_code == 1
    assert fracgen("publish", folder).exit_code == 0  # publish writes the card again
    assert fracgen("verify", folder).exit_code == 0 and (folder / "README.md").read_text() == \
        (published / "README.md").read_text()


# --- 13a. AWS_ENDPOINT_URL -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", ["not a url", "http://", "ftp://x", "http://[::1", "http://x\x07y",
                                      "http://127.0.0.1:99999", "http://a b:9000"])
def test_an_invalid_aws_endpoint_url_is_one_line(endpoint, tmp_path, monkeypatch):
    pytest.importorskip("boto3", reason="boto3 is not installed (pip install fracgen[s3])")
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIATESTING",
                       "AWS_SECRET_ACCESS_KEY": "s3cret", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                       "AWS_CONFIG_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    says = "AWS_ENDPOINT_URL '" + endpoint.replace("\x07", "\\x07") + "' is not the http(s) URL of an S3 endpoint"
    for result in (fracgen("pull", "s3://fracgen-test/sets/a/", tmp_path / "p"),
                   fracgen("publish", tmp_path, "--to", "s3://fracgen-test/sets/a/")):
        line = one_line_error(result, says)
        assert "\x07" not in result.output and "s3cret" not in result.output, line
    assert not (tmp_path / "p").exists()


# --- 13b. a fake Dask scheduler ------------------------------------------------------------------------------------

def test_junk_msgpack_from_a_fake_scheduler_leaves_our_line_alone_on_stderr(tmp_path):
    """A peer that frames its first message as Dask does (8-byte total, frame count, frame lengths) and fills it with
    bytes msgpack refuses: dask logged 'CRITICAL - Failed to deserialize' and its traceback before our line."""
    pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install fracgen[dask])")
    import threading

    frames = (1).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"\xc1"  # one frame: a byte msgpack never uses
    server, held = socket.create_server(("127.0.0.1", 0)), []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(len(frames).to_bytes(8, "little") + frames)
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = subprocess.run([sys.executable, "-m", "fracgen", "render", "--out", str(tmp_path / "ds"), "--classes",
                                 "8", "--size", "64", "--scheduler", f"tcp://127.0.0.1:{server.getsockname()[1]}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:"), result.stderr
    assert "Traceback" not in result.stderr and "CRITICAL" not in result.stderr
    assert not (tmp_path / "ds").exists()


# --- 13c. fracgen score --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def claims_16384(tmp_path_factory) -> Path:
    """A real manifest edited to claim 16384 px (score reads no shard; every other check still holds)."""
    out = tmp_path_factory.mktemp("score") / "set"
    render_dataset(out, classes=20, size=32, points=3000, shard_size=20, seed=0, workers=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"]["size"] = manifest["image"]["size"] = 16384
    (out / "manifest.json").write_text(manifest_text(manifest))
    return out


def test_score_of_a_manifest_claiming_16384_px_estimates_first_and_refuses_past_its_bound(claims_16384):
    t0 = time.monotonic()
    result = fracgen("score", claims_16384, "--at", "32", "--max-minutes", "0.1")
    line = one_line_error(result, "scoring 20 classes renders 40 images of 16384 px: about ")
    assert time.monotonic() - t0 < 45  # two classes rendered to measure (~4 s each here), not twenty
    match = re.search(r"past the 6 s bound: score fewer classes \(--classes (\d+)\) or allow the time "
                      r"\(--max-minutes (\d+)\)", line)
    assert match and 2 <= int(match.group(1)) < 20 and int(match.group(2)) >= 1, line
    one_line_error(fracgen("score", claims_16384, "--max-minutes", "0"), "--max-minutes must be more than 0")


def test_a_long_score_says_its_estimate_before_the_work(tmp_path, monkeypatch):
    from fracgen import score

    folder = tmp_path / "set"
    render_dataset(folder, classes=8, size=256, points=3000, seed=0, workers=1)
    monkeypatch.setattr(score, "NOTE_SECONDS", 0.0)  # every estimate is worth a line here
    result = fracgen("score", folder, "--at", "32")
    assert result.exit_code == 0, result.output
    first = result.output.strip().splitlines()[0]
    assert re.fullmatch(r"note: scoring 8 classes renders 16 images of 256 px: about [0-9.]+ s", first), result.output
    monkeypatch.setattr(score, "MAX_SECONDS", 0.0)
    one_line_error(fracgen("info", folder, "--score-at", "32"), "past the 0 s bound")


# --- fracgen/manifest.py's card, _info.json and renderer checks in this process, each word exact (issue 39) -------

MANIFEST = {"complete": True, "settings": {"name": "onep"}, "renderer": 2,
            "shards": [{"file": "onep-000000.tar", "samples": 3}, {"file": "onep-000001.tar", "samples": 2}]}


def test_timm_info_is_derived_from_the_manifest_and_checked_against_it(tmp_path):
    from fracgen.manifest import TIMM_INFO, check_timm_info, timm_info, write_timm_info

    assert timm_info(MANIFEST) == {"name": "onep", "source": "fracgen manifest.json", "splits": {"train": {
        "name": "train", "num_samples": 5, "filenames": ["onep-000000.tar", "onep-000001.tar"],
        "shard_lengths": [3, 2]}}}
    assert check_timm_info(tmp_path, MANIFEST) is None  # none there: nothing to check
    write_timm_info(tmp_path, {**MANIFEST, "complete": False})
    assert not (tmp_path / TIMM_INFO).exists()  # an unfinished folder gets none
    write_timm_info(tmp_path, MANIFEST)
    assert json.loads((tmp_path / TIMM_INFO).read_text()) == timm_info(MANIFEST)
    assert (tmp_path / TIMM_INFO).read_text().endswith("}\n") and '\n "name"' in (tmp_path / TIMM_INFO).read_text()
    assert check_timm_info(tmp_path, MANIFEST) is None
    other = {**MANIFEST, "shards": MANIFEST["shards"][:1]}
    assert check_timm_info(tmp_path, other) == ("_info.json does not match the manifest (`fracgen render --resume` "
                                                "or `fracgen publish` write it again)")
    assert check_timm_info(tmp_path, {**other, "complete": False}) is None
    write_timm_info(tmp_path, MANIFEST)
    with open(tmp_path / TIMM_INFO, "ab") as f:
        f.write(b" ")  # one byte more: not the manifest's
    assert check_timm_info(tmp_path, MANIFEST).startswith("_info.json does not match")
    (tmp_path / TIMM_INFO).unlink()
    (tmp_path / TIMM_INFO).mkdir()  # unreadable: not the manifest's
    assert check_timm_info(tmp_path, MANIFEST).startswith("_info.json does not match")


def _card(folder: Path, front: str) -> None:
    (folder / "README.md").write_text(f"---\n{front}\n---\n# a card\n")


@pytest.mark.parametrize(("front", "says"), [
    ("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: onep-*.tar", None),
    ("configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: '*.tar'",
     "its data_files path '*.tar' is not the shards' 'onep-*.tar'"),
    ("configs:\n- config_name: default\n  data_files: ../other/*.tar", "its data_files path '../other/*.tar' is "
                                                                       "outside the folder"),
    ("configs:\n- data_dir: /etc", "its data_dir '/etc' is outside the folder"),
    ("configs:\n- data_files: {train: ['hf://x/y']}", "its data_files path 'hf://x/y' is outside the folder"),
    ("configs:\n- data_files: [{split: train, path: ['~/x']}]", "its data_files path '~/x' is outside the folder"),
    ("configs:\n- data_files: 'C:x'", "its data_files path 'C:x' is outside the folder"),
    ("configs:\n- data_files: '\\server'", "its data_files path '\\server' is outside the folder"),
    ("configs: [1, {data_files: 7}]", "its configs are not the ones `fracgen publish` writes (data_files "
                                      "'onep-*.tar')"),
    ("title: no configs", "its configs are not the ones `fracgen publish` writes"),
    ("configs: [: bad", "its front matter is not YAML ("),
])
def test_a_cards_configs_are_held_to_the_ones_publish_writes(tmp_path, front, says):
    from fracgen.manifest import check_card

    _card(tmp_path, front)
    problem = check_card(tmp_path, MANIFEST)
    if says is None:
        assert problem is None
        return
    assert problem.startswith(f"README.md (dataset card): {says}"), problem
    assert problem.endswith(": `fracgen publish` writes it again")


def test_a_card_that_is_missing_too_large_not_text_or_overridden(tmp_path):
    from fracgen.manifest import MAX_CARD_BYTES, check_card

    assert check_card(tmp_path, MANIFEST) is None
    (tmp_path / "README.md").write_bytes(b"\xff\xfe---")
    assert check_card(tmp_path, MANIFEST) == ("README.md (dataset card): not UTF-8 text: `fracgen publish` writes it "
                                              "again")
    (tmp_path / "README.md").write_bytes(b"x" * MAX_CARD_BYTES)
    assert check_card(tmp_path, MANIFEST).startswith("README.md (dataset card): its configs are not")  # exactly 1 MiB
    (tmp_path / "README.md").write_bytes(b"x" * (MAX_CARD_BYTES + 1))
    assert check_card(tmp_path, MANIFEST) == ("README.md (dataset card): larger than the 1,048,576 bytes fracgen reads "
                                              "of it: `fracgen publish` writes it again")
    (tmp_path / ".huggingface.yaml").write_text("configs: []")
    assert check_card(tmp_path, MANIFEST) == (".huggingface.yaml: `datasets` reads its configs over the card's, and "
                                              "fracgen writes none (remove it)")
    (tmp_path / ".huggingface.yaml").unlink()
    (tmp_path / "README.md").unlink()
    (tmp_path / "README.md").mkdir()
    assert check_card(tmp_path, MANIFEST).startswith("README.md (dataset card): unreadable (")


def test_each_card_refusal_is_exact_and_names_at_most_300_characters_of_a_path(tmp_path):
    from fracgen.manifest import check_card

    again = ": `fracgen publish` writes it again"
    _card(tmp_path, "configs:\n- junk\n- data_files: /etc/passwd")  # past an entry that is no config
    assert check_card(tmp_path, MANIFEST) == ("README.md (dataset card): its data_files path '/etc/passwd' is outside "
                                              "the folder (`datasets` would read data from there)" + again)
    _card(tmp_path, "configs:\n- data_dir: sub")  # inside, but no configs publish writes: the general line
    assert check_card(tmp_path, MANIFEST) == ("README.md (dataset card): its configs are not the ones `fracgen "
                                              "publish` writes (data_files 'onep-*.tar')" + again)
    long = " ".join(f"w{i:03d}" for i in range(100))  # words: printable() leaves them whole
    _card(tmp_path, f"configs:\n- data_files: /{long}")
    assert check_card(tmp_path, MANIFEST).startswith(f"README.md (dataset card): its data_files path '/{long[:299]}' "
                                                     "is outside")
    _card(tmp_path, f"configs:\n- data_files: {long}")
    assert check_card(tmp_path, MANIFEST) == (f"README.md (dataset card): its data_files path '{long[:300]}' is not "
                                              "the shards' 'onep-*.tar'" + again)
    _card(tmp_path, "configs: [: bad")
    assert check_card(tmp_path, MANIFEST) == ("README.md (dataset card): its front matter is not YAML (while parsing "
                                              "a flow node)" + again)
    (tmp_path / "README.md").unlink()
    (tmp_path / "README.md").mkdir()
    assert check_card(tmp_path, MANIFEST) == "README.md (dataset card): unreadable (Is a directory)"


def test_only_the_first_hundred_paths_of_a_list_are_read():
    from fracgen.manifest import _card_paths

    many = [{"data_files": [f"p{i}" for i in range(150)]}] * 150
    paths = list(_card_paths(many))
    assert len(paths) == 100 * 100 and paths[0] == ("data_files path", "p0") and paths[99] == ("data_files path",
                                                                                                "p99")
    assert list(_card_paths({"not": "a list"})) == [] and list(_card_paths(["x", {"data_dir": 3}])) == []
    by_split = [{"data_files": {f"s{j}": [f"q{i}" for i in range(120)] for j in range(120)}}]
    assert len(list(_card_paths(by_split))) == 100 * 100


def test_a_data_set_of_another_renderer_says_so_in_one_wording():
    from fracgen.manifest import other_renderer, renderer_of
    from fracgen.render import RENDERER

    assert renderer_of({}) == 1 and renderer_of({"renderer": 5}) == 5
    assert other_renderer({"renderer": RENDERER}) is None
    assert other_renderer({}) == f"drawn by renderer 1; this fracgen draws renderer {RENDERER}, whose images differ"


def test_a_folder_without_a_readable_manifest_is_one_line_naming_it(tmp_path):
    from fracgen.manifest import load_manifest, read_manifest

    with pytest.raises(FracgenError) as refused:
        read_manifest(tmp_path / "none")
    assert str(refused.value) == f"{tmp_path / 'none'} is not a directory"
    with pytest.raises(FracgenError) as refused:
        read_manifest(tmp_path)
    assert str(refused.value) == f"no manifest.json in {tmp_path}: not a fracgen dataset"
    with pytest.raises(FracgenError) as refused:
        load_manifest(tmp_path / "manifest.json")
    assert str(refused.value) == f"no manifest.json at {tmp_path}: not a fracgen dataset"
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(FracgenError) as refused:
        read_manifest(tmp_path)
    assert str(refused.value).startswith(f"{tmp_path / 'manifest.json'} is unreadable: ")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(FracgenError) as refused:
        read_manifest(tmp_path)
    assert str(refused.value) == (f"{tmp_path / 'manifest.json'} is not a usable fracgen manifest: its 'format' is "
                                  "not fracgen-shards")


def test_a_missing_or_mistyped_field_is_named_with_what_it_should_be(tmp_path):
    from fracgen.dataset import render_dataset
    from fracgen.manifest import check_manifest

    folder = tmp_path / "set"
    render_dataset(folder, classes=2, size=32, points=2000, seed=0, workers=1)
    good = json.loads((folder / "manifest.json").read_text())
    assert check_manifest(good, folder / "manifest.json") is good

    def says(manifest) -> str:
        with pytest.raises(FracgenError) as refused:
            check_manifest(manifest, Path("m.json"))
        return str(refused.value).removeprefix("m.json is not a usable fracgen manifest: ")

    assert says({**good, "complete": "yes"}) == "'complete' is str, not bool"
    assert says({k: v for k, v in good.items() if k != "complete"}) == "'complete' is missing, not bool"
    assert says({**good, "format_version": True}) == "'format_version' is bool, not int"
    assert says({**good, "image": {**good["image"], "size": "32"}}) == "image.'size' is str, not int"
    shard = {k: v for k, v in good["shards"][0].items() if k != "sha256"}
    assert says({**good, "shards": [shard]}) == "a shard's 'sha256' is missing, not str"
