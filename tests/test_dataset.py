import dataclasses
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fracgen import FracgenError
from fracgen.dataset import render_dataset, verify_dataset
from fracgen.ifs import IFS
from fracgen.render import render


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_are_identical_for_any_worker_count(tmp_path, small_settings):
    m1 = render_dataset(tmp_path / "w1", small_settings, workers=1)
    m2 = render_dataset(tmp_path / "w2", small_settings, workers=2)
    assert [e["file"] for e in m1["shards"]] == ["1p-frac-000000.tar", "1p-frac-000001.tar", "1p-frac-000002.tar"]
    assert m1["shards"] == m2["shards"]
    for e in m1["shards"]:
        assert sha(tmp_path / "w1" / e["file"]) == sha(tmp_path / "w2" / e["file"]) == e["sha256"]
        assert (tmp_path / "w1" / e["file"]).stat().st_size == e["bytes"]
    assert m1["classes"] == m2["classes"] and m1["base"] == m2["base"]


def test_manifest_records_everything(tmp_path, small_settings):
    m = render_dataset(tmp_path, small_settings, workers=1, command="fracgen render ...")
    text = (tmp_path / "manifest.json").read_text()
    assert json.loads(text) == m
    assert sum(line.lstrip().startswith('{"class": ') for line in text.splitlines()) == 12  # a line each
    assert m["complete"] and m["format_version"] == 1 and m["fracgen_version"]
    assert m["num_classes"] == 12 and m["num_samples"] == 12 and m["command"] == "fracgen render ..."
    assert m["settings"]["sigma"] == 3.5 and m["settings"]["delta"] == 0.1
    assert 3.4 <= m["base"]["sigma_drawn"] <= 3.6 and m["base"]["fill"] > 0.05
    assert [c["class"] for c in m["classes"]] == list(range(12))
    assert all(c["fill"] > 0.05 for c in m["classes"])
    assert sum(e["samples"] for e in m["shards"]) == 12


def test_samples_read_back_with_webdataset_and_tarfile(tmp_path, small_settings):
    m = render_dataset(tmp_path, small_settings, workers=1)
    urls = [str(tmp_path / e["file"]) for e in m["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False, handler=wds.reraise_exception).decode("pill")
    seen = []
    for sample in ds:
        image, label, meta = sample["png"], sample["cls"], sample["json"]
        assert image.mode == "L" and image.size == (64, 64)
        assert label == meta["class"] and "." not in sample["__key__"]
        # the image is exactly the render of the parameters stored beside it
        system = IFS.from_json(meta["ifs"])
        again, fill = render(system, meta["seed"], points=4000, size=64)
        np.testing.assert_array_equal(np.asarray(image), again)
        assert fill == meta["fill"] > 0.05
        seen.append(label)
    assert sorted(seen) == list(range(12))
    # a plain tarfile + Pillow reader, as someone without webdataset would use
    with tarfile.open(urls[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["c000000-i000000.cls", "c000000-i000000.json", "c000000-i000000.png"]
        member = tar.getmember("c000000-i000000.png")
        assert member.mtime == 0 and member.uid == 0 and member.uname == ""
        Image.open(io.BytesIO(tar.extractfile(member).read())).load()


def test_per_class_instances_interleave_classes(tmp_path, small_settings):
    s = dataclasses.replace(small_settings, classes=4, per_class=3, shard_size=4)
    m = render_dataset(tmp_path, s, workers=1)
    keys = []
    for e in m["shards"]:
        with tarfile.open(tmp_path / e["file"]) as tar:
            keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".cls")]
    assert keys[:5] == ["c000000-i000000", "c000001-i000000", "c000002-i000000", "c000003-i000000",
                        "c000000-i000001"]
    assert len(keys) == 12 == len(set(keys))


def test_verify_detects_a_flipped_byte(tmp_path, small_settings):
    m = render_dataset(tmp_path, small_settings, workers=1)
    assert verify_dataset(tmp_path) == []
    path = tmp_path / m["shards"][1]["file"]
    data = bytearray(path.read_bytes())
    data[2000] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_dataset(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("1p-frac-000001.tar: sha256")


def test_refuses_to_overwrite_then_overwrites(tmp_path, small_settings):
    render_dataset(tmp_path, small_settings, workers=1)
    before = sha(tmp_path / "1p-frac-000000.tar")
    with pytest.raises(FracgenError, match="already holds a dataset"):
        render_dataset(tmp_path, small_settings, workers=1, delta=0.2)
    assert sha(tmp_path / "1p-frac-000000.tar") == before  # nothing touched
    m = render_dataset(tmp_path, small_settings, workers=1, overwrite=True, classes=4)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["1p-frac-000000.tar"]  # stale shards gone
    assert m["num_samples"] == 4 and verify_dataset(tmp_path) == []


def test_resume_completes_only_missing_shards(tmp_path, small_settings):
    m = render_dataset(tmp_path, small_settings, workers=1)
    (tmp_path / "1p-frac-000001.tar").unlink()
    (tmp_path / ".1p-frac-000001.tar.x1y2.tmp").write_bytes(b"half a shard from a killed run")
    keep = tmp_path / "1p-frac-000000.tar"
    mtime = keep.stat().st_mtime_ns
    m2 = render_dataset(tmp_path, small_settings, workers=2, resume=True)
    assert m2["shards"] == m["shards"]
    assert keep.stat().st_mtime_ns == mtime  # not rewritten
    assert verify_dataset(tmp_path) == []
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(FracgenError, match="different settings.*delta"):
        render_dataset(tmp_path, small_settings, workers=1, resume=True, delta=0.3)


def test_resume_refuses_to_mix_renderers(tmp_path, small_settings):
    render_dataset(tmp_path, small_settings, workers=1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["renderer"]  # as written by fracgen 0.1, whose renderer drew other pixels
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    before = (tmp_path / "manifest.json").read_bytes()
    # finished: nothing to render, so --resume (as `make pretrain` passes) succeeds and changes nothing
    assert render_dataset(tmp_path, small_settings, workers=1, resume=True) == manifest
    assert (tmp_path / "manifest.json").read_bytes() == before
    (tmp_path / "1p-frac-000001.tar").unlink()
    refused = "drawn by renderer 1; this fracgen draws renderer 3, whose images differ, so they cannot be drawn again"
    with pytest.raises(FracgenError, match=refused):
        render_dataset(tmp_path, small_settings, workers=1, resume=True)


def test_degenerate_base_fails_naming_it(tmp_path, small_settings):
    # a base whose perturbations never ink more than 90% of the canvas
    with pytest.raises(FracgenError, match="class 0: no perturbation .* base sampled from seed 3"):
        render_dataset(tmp_path, small_settings, workers=1, fill=0.05, max_retries=2,
                       base=None, delta=5.0, perturb="shift")


def test_base_from_file_is_reused(tmp_path, small_settings):
    m = render_dataset(tmp_path / "a", small_settings, workers=1)
    m2 = render_dataset(tmp_path / "b", small_settings, workers=1, base=m["base"]["ifs"], seed=99)
    assert m2["base"]["source"] == "file" and m2["base"]["ifs"] == m["base"]["ifs"]


def test_shard_bytes_equal_pythons_tarfile(tmp_path, small_settings):
    # the shard writer builds USTAR headers itself (for speed); they must be the bytes tarfile writes
    m = render_dataset(tmp_path, small_settings, workers=1)
    path = tmp_path / m["shards"][0]["file"]
    with tarfile.open(path) as tar:
        members = [(ti.name, tar.extractfile(ti).read()) for ti in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
            tar.addfile(ti, io.BytesIO(data))
    assert buf.getvalue() == path.read_bytes()


def test_default_workers_grow_with_the_render():
    from fracgen.dataset import Settings, available_cores, default_workers

    assert default_workers(Settings(classes=1000)) == 1  # the 1p-frac set: start-up would cost more
    assert default_workers(Settings(classes=1000, per_class=1000)) == available_cores()


def test_png_decode_reads_fracgen_pngs_and_any_other_grayscale_png():
    from fracgen import png

    rng = np.random.default_rng(0)
    image = (rng.random((37, 53)) * 255).astype(np.uint8)
    fast = png.decode(png.encode(image, level=1))
    assert np.array_equal(fast, image) and fast.flags.writeable and fast.flags.c_contiguous
    for mode in ("L", "RGB"):  # Pillow's PNGs use row filters: decoded through Pillow, to L
        buf = io.BytesIO()
        Image.fromarray(image).convert(mode).save(buf, format="PNG")
        assert np.array_equal(png.decode(buf.getvalue()), image)


# --- fracgen/shards.py in this process (issue 39): every byte a shard is made of, every refusal's words -------------

def _sample(label=1, instance=0, size=8, meta=None):
    from fracgen import png
    from fracgen.shards import Sample

    image = (np.arange(size * size) % 251).astype(np.uint8).reshape(size, size)
    return Sample(f"c{label:06d}-i{instance:06d}", png.encode(image), label, meta or {"a": 1})


def test_a_shard_entry_is_its_name_count_size_and_sha256_padded_to_whole_records(tmp_path):
    from fracgen.shards import RECORD, shard_in_memory, write_shard_unfinished

    samples = [_sample(1, 0), _sample(2, 0)]
    data, entry = shard_in_memory("s.tar", samples)
    assert entry == {"file": "s.tar", "samples": 2, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert len(data) % RECORD == 0 and RECORD == 10240
    tmp, on_disk = write_shard_unfinished(tmp_path / "s.tar", samples)
    assert on_disk == entry and tmp.read_bytes() == data
    assert tmp.parent == tmp_path and tmp.name.startswith(".s.tar.") and tmp.name.endswith(".tmp")
    assert not (tmp_path / "s.tar").exists()  # the caller renames it once recorded
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["c000001-i000000.cls", "c000001-i000000.json", "c000001-i000000.png",
                                         "c000002-i000000.cls", "c000002-i000000.json", "c000002-i000000.png"]
    assert all((m.mode, m.uid, m.gid, m.mtime, m.uname) == (0o644, 0, 0, 0, "") for m in members)
    empty, entry = shard_in_memory("e.tar", [])
    assert entry["samples"] == 0 and len(empty) == RECORD and empty == bytes(RECORD)


def test_a_tar_member_name_is_at_most_100_bytes():
    from fracgen.shards import ustar_header

    assert ustar_header("n" * 100, 5)[:100] == b"n" * 100
    with pytest.raises(FracgenError) as refused:
        ustar_header("n" * 101, 5)
    assert str(refused.value) == "tar member name longer than 100 bytes: " + "n" * 101


def test_shard_bytes_from_a_worker_are_kept_only_as_recorded(tmp_path):
    from fracgen.shards import _umask, shard_in_memory, write_bytes_unfinished

    data, entry = shard_in_memory("s.tar", [_sample()])
    tmp = write_bytes_unfinished(tmp_path / "s.tar", data, entry)
    assert tmp.read_bytes() == data and oct(tmp.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    for other in (data[:-1], data[:-1] + b"\x01"):
        with pytest.raises(FracgenError) as refused:
            write_bytes_unfinished(tmp_path / "t.tar", other, entry)
        assert str(refused.value) == "shard s.tar arrived from a worker with other bytes than the worker recorded"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name]


def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path):
    import errno

    from fracgen.shards import atomic_write

    with pytest.raises(FracgenError) as refused:
        atomic_write(tmp_path / "missing" / "f", lambda f: f.write(b"x"))
    assert str(refused.value) == f"cannot write {tmp_path / 'missing' / 'f'}: No such file or directory"

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FracgenError) as refused:
        atomic_write(tmp_path / "f", full)
    assert str(refused.value).startswith(f"cannot write {tmp_path / 'f'}: No space left on device (the disk is "
                                         "full: ")
    assert str(refused.value).endswith(f" MiB free in {tmp_path}): make room, then run the same command again")

    def no_file_left(*args, **kwargs):  # a full disk (or inode table) refuses even the temporary's creation
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr("fracgen.shards.tempfile.mkstemp", no_file_left)
        with pytest.raises(FracgenError) as refused:
            atomic_write(tmp_path / "f", lambda f: f.write(b"x"))
    assert str(refused.value).endswith(f" MiB free in {tmp_path}): make room, then run the same command again")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f", interrupted)
    (tmp_path / "d").mkdir()  # the rename fails: a folder has the name
    with pytest.raises(OSError):
        atomic_write(tmp_path / "d", lambda f: f.write(b"x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert atomic_write(tmp_path / "g", lambda f: f.write(b"abc")) == 3 and (tmp_path / "g").read_bytes() == b"abc"


def test_why_not_written_says_a_full_disk_with_its_free_space_and_other_errors_as_they_are(tmp_path):
    import errno
    import shutil

    from fracgen.shards import why_not_written

    free = f"{shutil.disk_usage(tmp_path).free / 2**20:,.0f} MiB free"
    for code in (errno.ENOSPC, errno.EDQUOT):
        assert why_not_written(OSError(code, "Disk quota exceeded"), tmp_path) == (
            f"Disk quota exceeded (the disk is full: {free} in {tmp_path}): make room, then run the same command "
            "again")
    assert why_not_written(OSError(errno.ENOSPC, ""), tmp_path / "gone").startswith(
        f"no space left (the disk is full: free space unknown in {tmp_path / 'gone'})")
    assert why_not_written(OSError(errno.EACCES, "Permission denied"), tmp_path) == "Permission denied"
    assert why_not_written(OSError("plain"), tmp_path) == "plain"


def test_a_file_matches_a_record_only_at_its_size_and_sha256(tmp_path):
    from fracgen.shards import file_sha256, matches

    big = tmp_path / "big"
    data = bytes(range(256)) * (3 * 4096 + 1)  # past the 1 MiB read size
    big.write_bytes(data)
    assert file_sha256(big) == (hashlib.sha256(data).hexdigest(), len(data))
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert matches(big, entry)
    assert not matches(big, {**entry, "bytes": len(data) + 1}) and not matches(big, {**entry, "sha256": "0" * 64})
    assert not matches(tmp_path / "none", entry)


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(("change", "says"), [
    (lambda p: p.pop("cls"), "sample {k} lacks .cls"),
    (lambda p: (p.pop("cls"), p.pop("json")), "sample {k} lacks .cls, .json"),
    (lambda p: p.update(cls=b"one"), "sample {k} has a non-integer .cls"),
    (lambda p: p.update(cls=b"5"), "sample {k} has class 5 outside 0..4"),
    (lambda p: p.update(cls=b"-1"), "sample {k} has class -1 outside 0..4"),
    (lambda p: p.update(cls=b"2"), "sample {k} has class 2 in its .cls"),
    (lambda p: p.update(json=b"{"), "sample {k}: sample {k}'s .json"),
    (lambda p: p.update(png=b"\x89PNG"), "sample {k}: "),
])
def test_each_way_a_sample_is_broken_has_its_own_words(change, says):
    from fracgen.shards import check_sample

    s = _sample(label=4)
    parts = {"cls": b"4", "json": b"{}", "png": s.png}
    assert check_sample(s.key, dict(parts), 5) is None and check_sample(s.key, dict(parts), 5, size=8) is None
    change(parts)
    problem = check_sample(s.key, parts, 5)
    assert problem is not None and problem.startswith(says.format(k=s.key)), problem


def test_a_sample_of_another_size_is_refused_when_the_size_is_known():
    from fracgen.shards import check_sample

    s = _sample(label=0, size=8)
    parts = {"cls": b"0", "json": b"{}", "png": s.png}
    assert check_sample(s.key, parts, 1, size=16).startswith(f"sample {s.key}: ")


def test_a_shard_is_checked_against_its_entry_in_order(tmp_path):
    from fracgen.shards import check_shard_contents, iter_samples, shard_in_memory, verify_shard

    samples = [_sample(0, 0), _sample(1, 0), _sample(0, 1)]
    data, entry = shard_in_memory("s.tar", samples)
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    assert verify_shard(path, entry, 2, size=8, first=0) is None
    assert [k for k, _ in iter_samples(path)] == [s.key for s in samples]
    assert verify_shard(tmp_path / "none.tar", entry, 2) == "missing"
    assert verify_shard(path, {**entry, "bytes": entry["bytes"] + 1}, 2) == \
        f"size {entry['bytes']} bytes, manifest says {entry['bytes'] + 1}"
    other = "f" * 64
    assert verify_shard(path, {**entry, "sha256": other}, 2) == \
        f"sha256 {entry['sha256'][:12]}... does not match the manifest's ffffffffffff..."
    assert check_shard_contents(path, entry, 2, first=2) == \
        "sample 0 is 'c000000-i000000', not the sample the manifest puts there"
    assert check_shard_contents(path, {**entry, "samples": 2}, 2) == "at least 3 samples, manifest says 2"
    assert check_shard_contents(path, {**entry, "samples": 4}, 2) == "3 samples, manifest says 4"
    assert check_shard_contents(path, entry, 1) == f"sample {samples[1].key} has class 1 outside 0..0"
    path.write_bytes(b"not a tar" * 100)
    assert check_shard_contents(path, entry, 2).startswith("not a readable tar: ")
    path.write_bytes(_tar([("c000000-i000000", None), ("c000000-i000000.cls", b"0"),
                           ("c000000-i000000.json", b"{}"), ("c000000-i000000.png", samples[0].png)]))
    assert [k for k, _ in iter_samples(path)] == ["c000000-i000000"]  # a folder member is not a sample's part
    assert check_shard_contents(path, {**entry, "samples": 1}, 2, size=8, first=0) is None


def test_the_largest_sample_and_shard_bound_what_pull_writes():
    from fracgen import png
    from fracgen.shards import BLOCK, RECORD, Sample, max_sample_bytes, max_shard_bytes, shard_in_memory

    raw = 64 * 65
    assert max_sample_bytes(64, 2) == 6 * BLOCK + 24 + 1024 + 2 * 512 + raw + 5 * 1 + 6 + 57
    assert max_sample_bytes(300, 0) - max_sample_bytes(300, 1) == -512
    big = 300 * 301  # more than one 64 KiB stored block
    assert max_sample_bytes(300, 0) == 6 * BLOCK + 24 + 1024 + big + 5 * (big // 65535 + 1) + 63
    assert max_shard_bytes(3, 64, 2) == 3 * max_sample_bytes(64, 2) + 2 * BLOCK + RECORD
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
    worst = Sample("c000000-i000000", png.encode(noise, level=0), 9, {"k": "v" * 900})
    data, _ = shard_in_memory("w.tar", [worst])
    assert len(data) <= max_shard_bytes(1, 64, 0)


def test_a_compressed_shard_a_long_key_and_a_large_json_are_read_as_fracgen_writes_them(tmp_path):
    import gzip

    from fracgen.shards import check_sample, check_shard_contents, shard_in_memory

    data, entry = shard_in_memory("s.tar", [_sample(0, 0)])
    path = tmp_path / "s.tar"
    path.write_bytes(gzip.compress(data))  # fracgen writes plain tar: a compressed one is not its shard
    assert check_shard_contents(path, entry, 1).startswith("not a readable tar: ")
    long = _sample(0, 0)
    long = dataclasses.replace(long, key=long.key + "-" + "x" * 60)
    path.write_bytes(shard_in_memory("s.tar", [long])[0])
    assert check_shard_contents(path, entry, 1, first=0) == (f"sample 0 is {long.key[:40]!r}, not the sample the "
                                                            "manifest puts there")
    s = _sample(0, 0)
    maps = json.dumps({"maps": [[0.123456789] * 6] * 40}).encode()  # 40 maps' worth: within 1024 + 512 per map
    assert len(maps) > 2000 and check_sample(s.key, {"cls": b"0", "json": maps, "png": s.png}, 1) is None


def test_sample_json_bytes_are_sorted_and_compact_and_the_archive_ends_as_tarfile_ends_it():
    from fracgen.shards import encode_json, shard_in_memory

    assert encode_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    for n in range(1, 14):  # 3 small samples fill a record to its last two blocks: the end blocks fit exactly
        samples = [_sample(i % 3, i // 3) for i in range(n)]
        data, _ = shard_in_memory("s.tar", samples)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                for ext, payload in (("cls", str(s.label).encode()), ("json", encode_json(s.meta)), ("png", s.png)):
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size, info.mode, info.uname, info.gname = len(payload), 0o644, "", ""
                    tar.addfile(info, io.BytesIO(payload))
        assert data == buf.getvalue(), n


def test_the_sample_bound_holds_an_incompressible_image_at_every_level():
    from fracgen import png
    from fracgen.shards import BLOCK, MAX_META_BYTES, max_sample_bytes

    # Noise does not compress: ISA-L's level 0 made it 1.23x larger and level 1 a few hundred bytes larger than
    # stored deflate, past this bound (pull and check_manifest would have refused such a shard); png stores it.
    for size, levels in ((512, (0, 1, 2, 3)), (3848, (0,))):  # 3848 x 3849 bytes of rows: 227 stored blocks
        noise = np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)
        for level in levels:
            encoded = png.encode(noise, level=level)
            assert len(encoded) <= max_sample_bytes(size, 0) - 6 * BLOCK - 24 - MAX_META_BYTES, (size, level)
            assert np.array_equal(png.decode(encoded, size), noise)
