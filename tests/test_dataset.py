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
