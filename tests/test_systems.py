"""Every data system through the one shard writer: format, labels, determinism, drawing a sample alone."""

import hashlib
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fracgen import FracgenError
from fracgen.dataset import Settings, render_dataset, render_sample, verify_dataset
from fracgen.ifs import IFS
from fracgen.render import render
from fracgen.systems import SYSTEMS
from fracgen.systems.fractaldb import FLIPS, VARIANTS, variant
from fracgen.systems.noise import noise_image
from fracgen.systems.real import class_affine

SMALL = dict(classes=6, per_class=5, size=64, points=3000, shard_size=7)


def read_back(out):
    urls = sorted(str(p) for p in out.glob("*.tar"))
    return [(s["__key__"], int(s["cls"]), json.loads(s["json"]), np.asarray(Image.open(io.BytesIO(s["png"]))))
            for s in wds.WebDataset(urls, shardshuffle=False)]


def shard_hashes(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_every_system_writes_verified_shards_with_labels_and_same_bytes_for_any_worker_count(tmp_path, system):
    s = Settings(system=system, **SMALL)
    m1 = render_dataset(tmp_path / "w1", s, workers=1)
    m2 = render_dataset(tmp_path / "w2", s, workers=2)
    assert m1["system"] == system and m1["settings"]["name"] == system and m1["complete"]
    assert shard_hashes(tmp_path / "w1") == shard_hashes(tmp_path / "w2")
    assert m1["classes"] == m2["classes"] and m1["base"] == m2["base"]
    assert verify_dataset(tmp_path / "w1") == []
    samples = read_back(tmp_path / "w1")
    assert len(samples) == s.num_samples
    for i, (key, cls, meta, image) in enumerate(samples):
        k, m = i % s.classes, i // s.classes
        assert key == f"c{k:06d}-i{m:06d}" and cls == k == meta["class"] and meta["instance"] == m
        assert image.shape == (s.size, s.size) and image.dtype == np.uint8 and image.max() <= 127
        drawn, drawn_meta = render_sample(m1, k, m)  # a sample drawn alone is the one in the shards
        assert np.array_equal(drawn, image) and drawn_meta == meta
    images = {k: samples[k][3] for k in range(s.classes)}
    assert len({im.tobytes() for im in images.values()}) == s.classes  # the classes differ


def test_fractaldb_classes_are_their_own_systems_with_variants_and_flips(tmp_path):
    s = Settings(system="fractaldb", classes=4, per_class=8, size=64, points=3000, shard_size=8)
    m = render_dataset(tmp_path, s, workers=1)
    systems = [IFS.from_json(c["ifs"]) for c in m["classes"]]
    assert len({sys.coef.tobytes() for sys in systems}) == 4  # unlike 1p-frac, no shared base
    by = {(meta["class"], meta["instance"]): (meta, image) for _, _, meta, image in read_back(tmp_path)}
    for (k, i), (meta, image) in by.items():
        assert meta["flip"] == FLIPS[i % 4]
        vsys, weight = variant(systems[k], (i // 4) % VARIANTS)
        assert meta["ifs"] == vsys.to_json() and meta["variant"] == weight
        plain, _ = render(vsys, meta["seed"], points=s.points, size=s.size, pad=s.pad)
        flipped = plain[:, ::-1] if meta["flip"] in ("lr", "both") else plain
        flipped = flipped[::-1] if meta["flip"] in ("ud", "both") else flipped
        assert np.array_equal(image, flipped)
    assert by[(0, 4)][0]["variant"] == {"coefficient": "a", "weight": 0.2}


def test_fractaldb_filling_search_keeps_fractaldbs_threshold(tmp_path):
    m = render_dataset(tmp_path, Settings(system="fractaldb", search="filling", classes=3, size=64, points=3000),
                       workers=1)
    assert all(c["fill"] > 0.2 for c in m["classes"])
    assert all(2 <= len(c["ifs"]["maps"]) <= 8 for c in m["classes"])


def test_real_classes_are_affine_perturbations_of_one_image_sized_by_delta(tmp_path):
    for mode in ("gray", "edges"):
        s = Settings(system="real", image_mode=mode, classes=3, per_class=2, size=64, shard_size=6)
        m = render_dataset(tmp_path / mode, s, workers=1)
        assert m["base"]["image_mode"] == mode and len(m["base"]["image_sha256"]) == 64
        samples = read_back(tmp_path / mode)
        for k in range(3):
            assert np.array_equal(samples[k][3], samples[k + 3][3])  # instances of a class are one image
            assert m["classes"][k]["affine"] == class_affine(s, k)[0]
    tiny = Settings(system="real", delta=0.0, classes=2, size=64)
    assert class_affine(tiny, 1)[0] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # Delta 0: the image itself
    offsets = np.abs(np.array(class_affine(Settings(system="real", delta=0.05, size=64), 7)[1]))
    assert offsets.max() <= 0.05


def test_real_takes_any_image_and_refuses_what_it_cannot_read(tmp_path):
    path = tmp_path / "mine.png"
    Image.fromarray((np.arange(80 * 120) % 251).astype(np.uint8).reshape(80, 120)).save(path)
    m = render_dataset(tmp_path / "ds", Settings(system="real", image=str(path), classes=2, size=32), workers=1)
    assert m["base"]["image"] == str(path)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(FracgenError, match="not an image Pillow can read"):
        render_dataset(tmp_path / "bad", Settings(system="real", image=str(tmp_path / "bad.png"), classes=2, size=32))
    with pytest.raises(FracgenError, match="--image not found"):
        render_dataset(tmp_path / "none", Settings(system="real", image=str(tmp_path / "x.png"), classes=2, size=32))


def test_noise_kinds_have_their_statistics():
    g = noise_image("gaussian", 1, 256).astype(float)
    u = noise_image("uniform", 1, 256).astype(float)
    assert abs(g.mean() - 63.5) < 1 and abs(g.std() - 32) < 1.5
    assert u.min() == 0 and u.max() == 127 and abs(u.mean() - 63.5) < 1 and abs(u.std() - 128 / 12**0.5) < 1
    assert np.array_equal(noise_image("gaussian", 1, 64), noise_image("gaussian", 1, 64))


@pytest.mark.parametrize(("settings", "match"), [
    (dict(system="mandelbrot"), "unknown --system 'mandelbrot'"),
    (dict(system="fractaldb", search="grid"), "--search must be one of sigma, filling"),
    (dict(system="real", image_mode="rgb"), "--image-mode must be one of gray, edges"),
    (dict(system="noise", noise="pink"), "--noise must be one of gaussian, uniform"),
    (dict(system="noise", base={"maps": [{"a": 0.5, "b": 0, "c": 0, "d": 0.5, "e": 0, "f": 0}]}),
     "--base applies to 1p-frac"),
])
def test_bad_system_settings_are_one_line(tmp_path, settings, match):
    with pytest.raises(FracgenError, match=match):
        render_dataset(tmp_path / "ds", Settings(**settings, classes=2, size=32))
    assert not (tmp_path / "ds").exists()


def test_resume_of_another_system_finishes_it_with_the_same_bytes(tmp_path):
    s = Settings(system="fractaldb", **SMALL)
    whole = tmp_path / "whole"
    render_dataset(whole, s, workers=1)
    part = tmp_path / "part"
    m = render_dataset(part, s, workers=1)
    (part / m["shards"][1]["file"]).unlink()
    (part / m["shards"][2]["file"]).write_bytes(b"edited")
    render_dataset(part, s, workers=1, resume=True)
    assert shard_hashes(part) == shard_hashes(whole)
    with pytest.raises(FracgenError, match="system='fractaldb'->'noise'"):
        render_dataset(part, Settings(system="noise", name="fractaldb", **{k: v for k, v in SMALL.items()}),
                       resume=True)


def test_several_bases_split_the_classes_and_base_0_is_the_one_base_draw(tmp_path):
    s = Settings(classes=8, size=64, points=3000, seed=5)
    one = render_dataset(tmp_path / "one", s, workers=1)
    four = render_dataset(tmp_path / "four", Settings(classes=8, size=64, points=3000, seed=5, bases=4), workers=1)
    bases = four["base"]["bases"]
    assert len(bases) == 4 and bases[0]["ifs"] == one["base"]["ifs"] == four["base"]["ifs"]
    assert len({json.dumps(b["ifs"]) for b in bases}) == 4
    assert [c["base"] for c in four["classes"]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert four["classes"][:2] == [{**c, "base": 0} for c in one["classes"][:2]]  # same draws for base 0
    for k in (2, 7):
        base = IFS.from_json(bases[four["classes"][k]["base"]]["ifs"])
        noise = np.array(four["classes"][k]["noise"])
        assert np.allclose(IFS.from_json(four["classes"][k]["ifs"]).coef, base.coef * noise)
    with pytest.raises(FracgenError, match="--bases must be at least 1 and divide --classes 8"):
        render_dataset(tmp_path / "bad", Settings(classes=8, size=64, bases=3))
