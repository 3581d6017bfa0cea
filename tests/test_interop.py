"""Issue 30: fracgen data in the tools people already train with. One folder is rendered and published; then timm's
own WebDataset reader (`create_dataset("wds/...")` + `create_loader`, what `train.py --dataset wds/NAME` calls),
Hugging Face `datasets.load_dataset` and `fracgen.torch` each read every sample with its label."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Server
from PIL import Image
from typer.testing import CliRunner

from fracgen import png
from fracgen.cli import app as fracgen_app
from fracgen.dataset import render_dataset, verify_dataset
from fracgen.errors import FracgenError
from fracgen.manifest import TIMM_INFO
from fracgen.torch import ShardDataset, ShardStream, _largest_member

CLASSES, PER_CLASS = 8, 2


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("interop") / "set"
    render_dataset(folder, classes=CLASSES, per_class=PER_CLASS, size=32, points=2000, shard_size=5, seed=0,
                   workers=1)
    result = CliRunner().invoke(fracgen_app, ["publish", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


def _labels(manifest: dict) -> list[int]:
    """Sample i is instance i // C of class i % C."""
    return [i % manifest["num_classes"] for i in range(manifest["num_samples"])]


def test_render_and_publish_write_timms_split_record(published, tmp_path):
    manifest = json.loads((published / "manifest.json").read_text())
    info = json.loads((published / TIMM_INFO).read_text())["splits"]["train"]
    assert info["filenames"] == [e["file"] for e in manifest["shards"]]
    assert info["shard_lengths"] == [e["samples"] for e in manifest["shards"]] and info["num_samples"] == 16
    assert f"  {TIMM_INFO}" in (published / "SHA256SUMS").read_text()
    # a folder rendered before fracgen wrote it gets one from --resume, nothing redrawn
    old = Path(shutil.copytree(published, tmp_path / "old"))
    (old / TIMM_INFO).unlink()
    before = {p.name: p.read_bytes() for p in old.glob("*.tar")}
    assert CliRunner().invoke(fracgen_app, ["render", "--out", str(old), "--classes", "8", "--per-class", "2",
                                            "--size", "32", "--points", "2000", "--shard-size", "5",
                                            "--resume"]).exit_code == 0
    assert (old / TIMM_INFO).read_bytes() == (published / TIMM_INFO).read_bytes()
    assert before == {p.name: p.read_bytes() for p in old.glob("*.tar")}
    (old / TIMM_INFO).write_text('{"splits": {}}')
    assert any(TIMM_INFO in p for p in verify_dataset(old))


def test_timms_own_reader_and_loader_read_every_sample_with_its_label(published):
    from timm.data import create_dataset, create_loader

    manifest = json.loads((published / "manifest.json").read_text())
    dataset = create_dataset("wds/1p-frac", root=str(published), split="train", is_training=False, batch_size=4)
    assert len(dataset) == manifest["num_samples"]
    seen = sorted(int(label) for _, label in dataset)
    assert seen == sorted(_labels(manifest))
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=4, is_training=False, num_workers=0,
                           mean=(0.5,) * 3, std=(0.5,) * 3, use_prefetcher=False, device=torch.device("cpu"))
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 16 and batches[0][0].shape == (4, 3, 32, 32)


def test_hugging_face_datasets_reads_the_published_folder(published, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install fracgen[datasets])")
    manifest = json.loads((published / "manifest.json").read_text())
    # its own cache: `datasets` keys a local folder's cache by the folder's name, so another folder called `set`
    # read before would be handed back
    ds = datasets.load_dataset(str(published), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == manifest["num_samples"]  # the shards only: manifest.json, _info.json, the card are not data
    assert sorted(ds["cls"]) == sorted(_labels(manifest))
    row = ds[3]
    assert row["png"].mode == "L" and row["png"].size == (32, 32)
    key = row["__key__"]
    k, m = int(key[1:7]), int(key[9:])
    assert row["cls"] == k and row["json"]["class"] == k and row["json"]["instance"] == m
    assert row["json"]["seed"] == json.loads(_member(published, key + ".json"))["seed"]  # 64-bit, exact


def _read_with_datasets(folder: Path, cache: Path, manifest: dict) -> None:
    """What a user of `datasets` does with any finished folder: load it, read the class names, stream it."""
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (pip install fracgen[datasets])")
    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(cache))
    names = [f"c{k:06d}" for k in range(manifest["num_classes"])]
    assert isinstance(ds.features["cls"], datasets.ClassLabel) and ds.features["cls"].names == names
    assert len(ds) == manifest["num_samples"] and sorted(ds["cls"]) == sorted(_labels(manifest))
    assert ds[0]["json"]["seed"] == json.loads(_member(folder, ds[0]["__key__"] + ".json"))["seed"]
    streamed = datasets.load_dataset(str(folder), split="train", streaming=True)
    assert sorted(row["cls"] for row in streamed) == sorted(_labels(manifest))


def test_every_finished_folder_is_a_hugging_face_dataset_with_named_classes(published, tmp_path):
    """A render, a resumed render, a pull and a publish each leave a folder `datasets.load_dataset` reads; render
    and pull write a local card (its configs and features), which publish replaces and which never replaces a
    card that is not fracgen's."""
    from fracgen import share
    from fracgen.manifest import CARD, LOCAL_MARK, PUBLISH_MARK

    manifest = json.loads((published / "manifest.json").read_text())
    rendered = tmp_path / "rendered"
    render_dataset(rendered, classes=CLASSES, per_class=PER_CLASS, size=32, points=2000, shard_size=5, seed=0,
                   workers=1)
    assert LOCAL_MARK in (rendered / CARD).read_text() and verify_dataset(rendered) == []
    _read_with_datasets(rendered, tmp_path / "hf1", manifest)

    (rendered / CARD).unlink()
    next(rendered.glob("*.tar")).unlink()  # a damaged folder, repaired by --resume: its card comes back
    render_dataset(rendered, classes=CLASSES, per_class=PER_CLASS, size=32, points=2000, shard_size=5, seed=0,
                   workers=1, resume=True)
    _read_with_datasets(rendered, tmp_path / "hf2", manifest)

    with Server(published) as server:
        pulled = share.pull(server.url, tmp_path / "pulled").folder
    assert LOCAL_MARK in (pulled / CARD).read_text()  # the source's card is not fetched: the local one is written
    _read_with_datasets(pulled, tmp_path / "hf3", manifest)

    assert PUBLISH_MARK in (published / CARD).read_text()
    _read_with_datasets(published, tmp_path / "hf4", manifest)

    own = tmp_path / "own"
    own.mkdir()
    (own / CARD).write_text("# my notes\n")  # the owner's card: render keeps it, --overwrite too
    render_dataset(own, classes=2, size=32, points=2000, seed=0, workers=1)
    assert (own / CARD).read_text() == "# my notes\n"
    render_dataset(own, classes=3, size=32, points=2000, seed=0, workers=1, overwrite=True)
    assert (own / CARD).read_text() == "# my notes\n"
    (own / CARD).unlink()
    render_dataset(own, classes=2, size=32, points=2000, seed=0, workers=1, overwrite=True)
    assert "c000001" in (own / CARD).read_text() and "c000002" not in (own / CARD).read_text()
    render_dataset(own, classes=3, size=32, points=2000, seed=0, workers=1, overwrite=True)
    assert "c000002" in (own / CARD).read_text()  # the local card of the data set it now holds


def test_a_card_names_classes_up_to_its_bound_and_then_keeps_cls_an_integer():
    from fracgen.manifest import MAX_CARD_BYTES, MAX_NAMED_CLASSES, card_front_matter

    def front(n):
        return "\n".join(card_front_matter({"num_classes": n, "settings": {"name": "x"}}))

    assert f"'{MAX_NAMED_CLASSES - 1}': c{MAX_NAMED_CLASSES - 1:06d}" in front(MAX_NAMED_CLASSES)
    assert len(front(MAX_NAMED_CLASSES).encode()) < MAX_CARD_BYTES  # what verify reads of a card
    assert "class_label" not in front(MAX_NAMED_CLASSES + 1) and "  - name: cls\n    dtype: int64" in \
        front(MAX_NAMED_CLASSES + 1)


def _member(folder: Path, name: str) -> bytes:
    import tarfile

    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            if name in tar.getnames():
                return tar.extractfile(name).read()
    raise KeyError(name)


def test_fracgen_torch_reads_by_index_and_as_a_stream_from_a_folder_or_a_url(published, tmp_path):
    from torchvision.transforms import ToTensor

    from fracgen.torch import ShardDataset, ShardStream

    manifest = json.loads((published / "manifest.json").read_text())
    ds = ShardDataset(published, transform=ToTensor())
    assert len(ds) == 16 and [ds[i][1] for i in range(16)] == _labels(manifest)
    image, _ = ds[5]
    assert image.shape == (1, 32, 32) and image.max() > 0
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=torch.utils.data.DistributedSampler(
        ds, num_replicas=2, rank=1, shuffle=False))
    assert sum(len(y) for _, y in loader) == 8  # one rank's half
    stream = ShardStream(published, transform=ToTensor())
    assert [label for _, label in stream] == _labels(manifest)
    shuffled = ShardStream(published, shuffle=True, buffer=4, seed=1)
    got = [label for _, label in torch.utils.data.DataLoader(shuffled, batch_size=None, num_workers=2)]
    assert sorted(got) == sorted(_labels(manifest)) and got != _labels(manifest)
    with Server(published) as server:
        remote = ShardDataset(server.url, cache_dir=tmp_path / "cache")
        assert [remote[i][1] for i in range(16)] == _labels(manifest)


def test_a_damaged_shard_through_fracgen_torch_is_one_line_naming_it_and_verify(published, tmp_path):
    from fracgen.torch import ShardDataset, ShardStream

    folder = Path(shutil.copytree(published, tmp_path / "damaged"))
    shard = sorted(folder.glob("*.tar"))[1]
    raw = bytearray(shard.read_bytes())
    raw[700] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(FracgenError, match=f"shard {shard} does not match its manifest \\(sha256\\): check the "
                                           f"folder with `fracgen verify {folder}`"):
        ShardDataset(folder)
    with pytest.raises(FracgenError, match="does not match its manifest"):
        list(ShardStream(folder))


# --- fracgen/torch.py's decisions in this process (issue 39): labels at their bounds, the deal over ranks and
# workers, equal lengths, shuffling by seed and epoch, what a shard read through its sha256 reports ----------------

def test_a_cls_is_a_class_below_the_count_in_at_most_32_bytes(tmp_path):
    from fracgen.torch import MAX_CLS_BYTES, _label

    assert MAX_CLS_BYTES == 32
    assert _label(b"7", 8, tmp_path, "s.tar", "k") == 7 and _label(b"0" * 31 + b"7", 8, tmp_path, "s.tar", "k") == 7
    for payload, shown in ((b"8", "b'8'"), (b"-1", "b'-1'"), (b"x", "b'x'"), (b"0" * 32 + b"1", "b'" + "0" * 20 + "'")):
        with pytest.raises(FracgenError) as refused:
            _label(payload, 8, tmp_path, "s.tar", "k" * 50)
        assert str(refused.value) == (f"shard {tmp_path / 's.tar'} does not match its manifest (sample "
                                      f"'{'k' * 40}' has class {shown}, not one of 8): check the folder with "
                                      f"`fracgen verify {tmp_path}`")


def _slots(stream, ranks: int, workers: int) -> list[list[int]]:
    """Each (rank, worker)'s labels, the placement faked as torch.distributed and DataLoader would report it."""
    out = []
    for slot in range(ranks * workers):
        stream._place = lambda s=slot: (s // workers, ranks, s % workers, workers)
        out.append([label for _, label in stream])
    return out


def test_shards_deal_out_over_ranks_and_workers_evenly_or_say_the_counts(published):
    from fracgen.torch import ShardStream

    manifest = json.loads((published / "manifest.json").read_text())
    labels = _labels(manifest)  # shards of 5, 5, 5 and 1 samples
    single = _slots(ShardStream(published), 1, 2)  # one process: workers may differ, nothing waits
    assert single == [labels[0:5] + labels[10:15], labels[5:10] + labels[15:16]]
    with pytest.raises(FracgenError) as refused:
        _slots(ShardStream(published), 2, 1)
    assert str(refused.value) == (f"{published}: 4 shards (16 samples) do not deal out evenly over 2 ranks x 1 "
                                  "DataLoader workers: the ranks would get 10, 6 samples (each worker 6 to 10), and "
                                  "a DDP loop waits forever for the rank that ends first: pass equal=True (every "
                                  "worker then reads ceil(16 / 2) = 8 samples, going round the shards again)")
    with pytest.raises(FracgenError, match=r"over 9 ranks x 1 DataLoader workers: the ranks would get 5, 5, 5, 1, 0, "
                                           r"0, 0, 0, \.\.\. samples \(each worker 0 to 5\)"):
        _slots(ShardStream(published), 9, 1)
    equal = _slots(ShardStream(published, equal=True), 3, 1)
    assert [len(s) for s in equal] == [6, 6, 6]  # ceil(16 / 3)
    assert equal[0] == labels[0:5] + labels[15:16] and equal[1] == labels[5:10] + labels[0:1]
    assert equal[2] == labels[10:15] + labels[5:6]


def test_shuffling_follows_the_seed_and_the_epoch_and_keeps_every_sample(published):
    from fracgen.torch import ShardStream

    def order(seed, epoch, buffer=4):
        stream = ShardStream(published, shuffle=True, buffer=buffer, seed=seed)
        stream.set_epoch(epoch)
        return [label for _, label in stream]

    labels = _labels(json.loads((published / "manifest.json").read_text()))
    first = order(1, 0)
    assert first == order(1, 0) and sorted(first) == sorted(labels) and first != labels
    assert order(1, 1) != first and order(2, 0) != first
    assert order(1, 0, buffer=100) != first  # the whole epoch in the buffer: shuffled at the end all the same
    assert [label for _, label in ShardStream(published, seed=1)] == labels  # no shuffle: the manifest's order


def test_a_shard_read_through_its_sha256_reports_its_size_or_its_hash(tmp_path):
    import hashlib
    import io

    from fracgen.torch import _Hashing

    data = bytes(range(256)) * 8192  # 2 MiB: the rest is read in 1 MiB steps
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    reader = _Hashing(io.BytesIO(data), hashlib.sha256())
    assert reader.readable() and reader.read(10) == data[:10]
    buffer = bytearray(6)
    assert reader.readinto(buffer) == 6 and bytes(buffer) == data[10:16]
    assert reader.finish(entry) is None
    assert _Hashing(io.BytesIO(data), hashlib.sha256()).finish({**entry, "sha256": "0" * 64}) == "sha256"
    short = _Hashing(io.BytesIO(data[:-1]), hashlib.sha256())
    assert short.finish(entry) == f"size: {len(data) - 1:,} bytes read, the manifest says {len(data):,}"
    long = _Hashing(io.BytesIO(data + bytes(3 << 20)), hashlib.sha256())
    assert long.finish(entry).startswith("size: ") and long.size <= len(data) + (1 << 20)  # reads no further


# --- fracgen/torch.py in this process, each refusal exact (issue 39's mutation pass) -----------------------------
# Shards forged so that their size and sha256 are what the manifest records, so only the check under test can refuse
# them; both readers (the indexed ShardDataset and the streaming ShardStream) on each; the cache folder a URL is
# pulled into; the shuffle order as the docs state it; `target_transform`.

SIZE = 32


@pytest.fixture(scope="module")
def reader_clean(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("torchreader") / "set"
    render_dataset(folder, classes=4, per_class=2, size=SIZE, points=2000, shard_size=2, seed=0, workers=1)
    return folder


@pytest.fixture
def reader_folder(reader_clean, tmp_path) -> Path:
    return Path(shutil.copytree(reader_clean, tmp_path / "set"))


def _forge(folder: Path, members: list[tuple[str, bytes]], shard: int = 0) -> str:
    """Shard `shard` replaced by a tar of `members`, its manifest entry made to match it (size, sha256)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _replace(folder, shard, buf.getvalue())
    return json.loads((folder / "manifest.json").read_text())["shards"][shard]["file"]


def _replace(folder: Path, shard: int, data: bytes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][shard]
    (folder / entry["file"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _grey(side: int = SIZE) -> bytes:
    return png.encode(np.zeros((side, side), dtype=np.uint8))


def _refusals(folder: Path) -> tuple[str, str]:
    """The one line each reader gives for the folder."""
    with pytest.raises(FracgenError) as indexed:
        ShardDataset(folder)
    with pytest.raises(FracgenError) as streamed:
        list(ShardStream(folder))
    return str(indexed.value), str(streamed.value)


def _says(folder: Path, shard: str, what: str) -> str:
    return f"shard {folder / shard} does not match its manifest ({what}): check the folder with `fracgen verify " \
           f"{folder}`"


def test_a_sample_without_its_class_or_image_is_refused_by_both_readers(reader_folder):
    folder = reader_folder
    shard = _forge(folder, [("c000000-i000000.png", _grey()), ("c000001-i000000.png", _grey()),
                            ("c000001-i000000.cls", b"1")])
    assert _refusals(folder) == (_says(folder, shard, "sample 'c000000-i000000' lacks its .png or .cls"),) * 2
    _forge(folder, [("c000000-i000000.cls", b"0"), ("c000001-i000000.png", _grey()),
                    ("c000001-i000000.cls", b"1")])
    assert _refusals(folder) == (_says(folder, shard, "sample 'c000000-i000000' lacks its .png or .cls"),) * 2


def test_a_member_larger_than_a_whole_sample_is_refused_before_it_is_read(tmp_path):
    folder = tmp_path / "big"  # 40 samples a shard: the manifest's bound on a shard leaves room for such a member
    render_dataset(folder, classes=4, per_class=10, size=SIZE, points=2000, shard_size=40, seed=0, workers=1)
    big = _largest_member(json.loads((folder / "manifest.json").read_text())) + 1
    shard = _forge(folder, [("c000000-i000000.cls", b"0"), ("c000000-i000000.png", bytes(big))])
    said = f"sample 'c000000-i000000' has a .png of {big:,} bytes, more than a whole sample of {SIZE} px takes"
    assert _refusals(folder) == (_says(folder, shard, said),) * 2


def test_bytes_that_are_not_a_tar_are_refused(reader_folder):
    folder = reader_folder
    _replace(folder, 0, b"\x01" * 1024)
    indexed, streamed = _refusals(folder)
    shard = json.loads((folder / "manifest.json").read_text())["shards"][0]["file"]
    for said in (indexed, streamed):
        assert said.startswith(f"shard {folder / shard} does not match its manifest (not a readable tar: ")
        assert said.endswith(f"): check the folder with `fracgen verify {folder}`")


def test_a_shard_that_cannot_be_opened_names_why(reader_folder):
    folder = reader_folder
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = manifest["shards"][0]["file"]
    (folder / shard).unlink()
    (folder / shard).mkdir()
    assert _refusals(folder) == (_says(folder, shard, "Is a directory"),) * 2
    (folder / shard).rmdir()
    assert _refusals(folder) == (_says(folder, shard, "No such file or directory"),) * 2


def test_an_image_of_another_size_or_colour_type_is_named_before_it_is_decoded(reader_folder):
    folder = reader_folder
    rgb = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(rgb, format="PNG")
    shard = _forge(folder, [("c000000-i000000.cls", b"0"), ("c000000-i000000.png", rgb.getvalue()),
                            ("c000001-i000000.cls", b"1"), ("c000001-i000000.png", _grey(16))])
    ds = ShardDataset(folder)  # the index reads headers only when an image is asked for
    with pytest.raises(FracgenError) as refused:
        ds[0]
    assert str(refused.value) == _says(folder, shard, f"sample 0 is a {SIZE}x{SIZE} px 8-bit RGB PNG, not the "
                                                      f"manifest's {SIZE}x{SIZE} px 8-bit grey")
    with pytest.raises(FracgenError) as refused:
        ds[1]
    assert str(refused.value) == _says(folder, shard, f"sample 1 is a 16x16 px 8-bit grey PNG, not the manifest's "
                                                      f"{SIZE}x{SIZE} px 8-bit grey")
    odd = bytearray(_grey())
    odd[25] = 5  # colour type 5 does not exist
    _forge(folder, [("c000000-i000000.cls", b"0"), ("c000000-i000000.png", bytes(odd)),
                    ("c000001-i000000.cls", b"1"), ("c000001-i000000.png", _grey())])
    with pytest.raises(FracgenError, match=r"sample 'c000000-i000000' is a 32x32 px 8-bit colour type 5 PNG"):
        list(ShardStream(folder))


def test_an_index_that_disagrees_with_the_manifests_count_is_one_line(reader_folder):
    folder = reader_folder
    _forge(folder, [("c000000-i000000.cls", b"0"), ("c000000-i000000.png", _grey())])  # 1 of its 2 samples
    with pytest.raises(FracgenError) as refused:
        ShardDataset(folder)
    assert str(refused.value) == (f"{folder} holds 7 samples, its manifest says 8: check it with `fracgen verify "
                                  f"{folder}`")


def test_target_transform_reaches_every_label(reader_clean):
    clean = reader_clean
    plain = [label for _, label in ShardDataset(clean)]
    assert [label for _, label in ShardDataset(clean, target_transform=lambda y: y + 100)] == [y + 100 for y in plain]
    assert [label for _, label in ShardStream(clean, target_transform=lambda y: -y)] == [-y for y in plain]


def test_the_shuffled_order_is_the_one_the_docs_state(reader_clean):
    clean = reader_clean
    """Shards in random.Random(seed * 1_000_003 + epoch)'s order, samples through a buffer drawn from by
    random.Random(seed * 1_000_003 + epoch + 7919): the order a user can reproduce, restated here."""
    manifest = json.loads((clean / "manifest.json").read_text())
    keys = {e["file"]: [f"c{i % 4:06d}-i{i // 4:06d}" for i in range(2 * n, 2 * n + 2)]
            for n, e in enumerate(manifest["shards"])}
    for seed, epoch, buffer in ((0, 0, 3), (5, 2, 1), (1, 1, 100)):
        shards = list(manifest["shards"])
        random.Random(seed * 1_000_003 + epoch).shuffle(shards)
        rng, pending, expected = random.Random(seed * 1_000_003 + epoch + 7919), [], []
        for key in (k for e in shards for k in keys[e["file"]]):
            pending.append(key)
            if len(pending) >= buffer:
                expected.append(pending.pop(rng.randrange(len(pending))))
        rng.shuffle(pending)
        expected += pending
        stream = ShardStream(clean, shuffle=True, buffer=buffer, seed=seed)
        stream.set_epoch(epoch)
        labels = [label for _, label in stream]
        assert labels == [int(k[1:7]) for k in expected], (seed, epoch, buffer)


def test_a_url_is_pulled_into_the_cache_it_is_given_or_xdg_or_home(reader_clean, tmp_path, monkeypatch):
    clean = reader_clean
    sha = hashlib.sha256((clean / "manifest.json").read_bytes()).hexdigest()
    with Server(clean) as server:
        assert ShardDataset(server.url, cache_dir=tmp_path / "given").folder == tmp_path / "given" / sha
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert ShardStream(server.url).folder == tmp_path / "xdg" / "fracgen" / sha
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        assert ShardDataset(server.url).folder == tmp_path / "home" / ".cache" / "fracgen" / sha
        server.requests.clear()
        assert len(ShardDataset(server.url)) == 8
        assert server.requests == ["/manifest.json"]  # found in the cache: the manifest fetched once, no shard


def test_both_readers_name_a_bad_class_long_keys_and_extensions_as_the_label_check_does(reader_folder):
    folder = reader_folder
    key = "c000000-i000000" + "x" * 45  # past the 40 characters a message shows
    shard = _forge(folder, [(f"{key}.cls", b"9"), (f"{key}.png", _grey()), ("c000001-i000000.cls", b"1"),
                            ("c000001-i000000.png", _grey())])
    said = f"sample '{key[:40]}' has class b'9', not one of 4"
    assert _refusals(folder) == (_says(folder, shard, said),) * 2
    _forge(folder, [(f"{key}.png", _grey()), ("c000001-i000000.cls", b"1"), ("c000001-i000000.png", _grey())])
    assert _refusals(folder) == (_says(folder, shard, f"sample '{key[:40]}' lacks its .png or .cls"),) * 2


def test_a_member_of_exactly_a_whole_samples_size_is_not_refused_for_its_size(tmp_path):
    folder = tmp_path / "big"
    render_dataset(folder, classes=4, per_class=10, size=SIZE, points=2000, shard_size=40, seed=0, workers=1)
    largest = _largest_member(json.loads((folder / "manifest.json").read_text()))
    members = [(f"c{k % 4:06d}-i{k // 4:06d}.{ext}", data) for k in range(40)
               for ext, data in (("cls", str(k % 4).encode()), ("png", _grey()))]
    members[1] = (members[1][0], bytes(largest))  # sample 0's .png at the bound: read, then refused as no PNG
    shard = _forge(folder, members)
    ds = ShardDataset(folder)  # indexed: the bound is not exceeded
    with pytest.raises(FracgenError, match=r"\(sample 0: "):
        ds[0]
    with pytest.raises(FracgenError) as refused:
        list(ShardStream(folder))
    assert "more than a whole sample" not in str(refused.value) and str(refused.value).startswith(
        f"shard {folder / shard} does not match its manifest (sample 'c000000-i000000': ")
    long_ext = "pngpngpngpngpng"  # an extension is shown to 10 characters
    members[1] = (f"c000000-i000000.{long_ext}", bytes(largest + 1))
    _forge(folder, members)
    with pytest.raises(FracgenError, match=rf"sample 'c000000-i000000' has a \.{long_ext[:10]} of "):
        list(ShardStream(folder))


def test_a_class_file_of_32_bytes_is_read_whole_and_odd_members_are_passed_over(reader_folder):
    folder = reader_folder
    members = [("c000000-i000000.cls", b"0" * 31 + b"1"), ("c000000-i000000.png", _grey()),
               ("c000001-i000000.cls", b"1"), ("c000001-i000000.png", _grey())]
    _forge(folder, members)
    assert [y for _, y in ShardDataset(folder)][:2] == [1, 1]  # 32 bytes: every digit read
    buf = io.BytesIO()  # a folder entry first: passed over, the samples after it read
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        directory = tarfile.TarInfo("a-folder")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _replace(folder, 0, buf.getvalue())
    assert [y for _, y in ShardStream(folder)][:2] == [1, 1]


def test_a_changed_byte_is_named_sha256_by_the_stream(reader_folder):
    folder = reader_folder
    entry = json.loads((folder / "manifest.json").read_text())["shards"][0]
    data = bytearray((folder / entry["file"]).read_bytes())
    data[-1] ^= 1  # in the end-of-archive padding: the tar still reads, only the hash differs
    (folder / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(FracgenError) as refused:
        list(ShardStream(folder))
    assert str(refused.value) == _says(folder, entry["file"], "sha256")


def test_the_stream_applies_its_transform_and_its_defaults_shuffle_from_seed_0_epoch_0(reader_clean, tmp_path):
    clean = reader_clean
    assert all(image == "seen" for image, _ in ShardStream(clean, transform=lambda image: "seen"))
    manifest = json.loads((clean / "manifest.json").read_text())
    shards = list(manifest["shards"])
    random.Random(0).shuffle(shards)  # seed 0, epoch 0: no set_epoch called
    labels = [label for _, label in ShardStream(clean, shuffle=True)]
    order = [i % 4 for n, e in enumerate(manifest["shards"]) for i in range(2 * n, 2 * n + 2)]
    assert sorted(labels) == sorted(order)
    rng, pending = random.Random(7919), []
    for e in shards:
        n = manifest["shards"].index(e)
        pending += [i % 4 for i in range(2 * n, 2 * n + 2)]
    rng.shuffle(pending)  # eight samples never fill the buffer of 1000: one shuffle at the end
    assert labels == pending
    sha = hashlib.sha256((clean / "manifest.json").read_bytes()).hexdigest()
    with Server(clean) as server:
        assert ShardStream(server.url, cache_dir=tmp_path / "given").folder == tmp_path / "given" / sha


def test_uneven_shards_over_eight_ranks_list_all_eight(reader_clean):
    stream = ShardStream(reader_clean)
    shards = json.loads((reader_clean / "manifest.json").read_text())["shards"]
    for ranks, listed in ((8, "the ranks would get 2, 2, 2, 2, 0, 0, 0, 0 samples"),
                          (9, "the ranks would get 2, 2, 2, 2, 0, 0, 0, 0, ... samples")):
        with pytest.raises(FracgenError, match=re.escape(listed)):
            stream._check_even(shards, ranks, 1)


def test_a_stream_in_a_one_rank_process_group_reads_every_sample(reader_clean, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert ShardStream._place() == (0, 1, 0, 1)
        assert len(list(ShardStream(reader_clean))) == 8
    finally:
        dist.destroy_process_group()


def test_every_message_shows_a_long_key_to_40_characters(tmp_path):
    folder = tmp_path / "big"
    render_dataset(folder, classes=4, per_class=10, size=SIZE, points=2000, shard_size=40, seed=0, workers=1)
    largest = _largest_member(json.loads((folder / "manifest.json").read_text()))
    key = "c000000-i000000" + "y" * 45
    members = [(f"c{k % 4:06d}-i{k // 4:06d}.{ext}", data) for k in range(40)
               for ext, data in (("cls", str(k % 4).encode()), ("png", _grey()))]
    members[:2] = [(f"{key}.cls", b"0"), (f"{key}.png", bytes(largest + 1))]
    shard = _forge(folder, members)
    said = f"sample '{key[:40]}' has a .png of {largest + 1:,} bytes, more than a whole sample of {SIZE} px takes"
    assert _refusals(folder) == (_says(folder, shard, said),) * 2
    rgb = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(rgb, format="PNG")
    members[1] = (f"{key}.png", rgb.getvalue())
    _forge(folder, members)
    with pytest.raises(FracgenError, match=re.escape(f"(sample '{key[:40]}' is a {SIZE}x{SIZE} px 8-bit RGB PNG")):
        list(ShardStream(folder))
