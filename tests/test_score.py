"""`fracgen score` (issue 23): data-only measures of how learnable a 1p-frac set is at a training resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fracgen import score
from fracgen.dataset import render_dataset


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[float, dict]:
    out = {}
    for delta in (0.1, 0.001):
        folder = tmp_path_factory.mktemp("score") / f"delta{delta}"
        render_dataset(folder, classes=48, size=128, points=20_000, delta=delta, seed=0, workers=1)
        out[delta] = json.loads((folder / "manifest.json").read_text())
    return out


def test_distances_equal_the_plain_pairwise_loop():
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 40), dtype=np.float32), rng.random((3, 40), dtype=np.float32)
    slow = np.array([[np.sqrt(np.mean((x - y) ** 2)) for y in b] for x in a])
    assert np.allclose(score._distances(a, b), slow, atol=1e-5)


def test_a_set_whose_classes_are_identical_scores_as_unlearnable(manifests):
    same = dict(manifests[0.1])
    same["classes"] = [same["classes"][0]] * len(same["classes"])
    (row,) = score.score(same, (32,))
    assert row["confusable"] > 0.9 and row["separation"] < 1 and row["diversity"] < 1.05


def test_delta_0001_scores_far_below_delta_01(manifests):
    (wide,), (narrow,) = score.score(manifests[0.1], (32,)), score.score(manifests[0.001], (32,))
    assert wide["separation"] > 1.1 > 1.0 > narrow["separation"]
    assert wide["confusable"] < 0.2 < 0.8 < narrow["confusable"]
    assert wide["diversity"] > 1.5 * narrow["diversity"]
    assert wide["classes"] == narrow["classes"] == 48 and 0 < narrow["fill"] < 1


def test_lower_resolutions_average_out_the_render_noise(manifests):
    """Two renders of one class differ by their chaos-game points and patch masks, pixel by pixel: at the rendered
    size that noise hides the classes' differences, shrunk to the training resolution it averages out."""
    low, full = score.score(manifests[0.1], (32, 128))
    assert low["separation"] > full["separation"] and low["spread"] < full["spread"]


def test_the_score_command_prints_the_measures_and_writes_json(manifests, tmp_path):
    from typer.testing import CliRunner

    from fracgen.cli import app

    folder = tmp_path / "set"
    render_dataset(folder, classes=12, size=64, points=4000, seed=1, workers=1)
    result = CliRunner().invoke(app, ["score", str(folder), "--at", "16", "--at", "32", "--json",
                                      str(tmp_path / "score.json")])
    assert result.exit_code == 0, result.output
    assert "separation" in result.output and "12 classes" in result.output
    rows = json.loads((tmp_path / "score.json").read_text())
    assert [r["at"] for r in rows] == [16, 32] and rows[1] == score.score(json.loads(
        (folder / "manifest.json").read_text()), (32,))[0]
    for args, says in ((["--at", "2"], "resolutions go from 4 to 4096"), (["--classes", "1"], "at least 2")):
        bad = CliRunner().invoke(app, ["score", str(folder), *args])
        assert bad.exit_code == 1 and says in bad.output and len(bad.output.strip().splitlines()) == 1
    shown = CliRunner().invoke(app, ["info", str(folder), "--score-at", "32"])
    assert shown.exit_code == 0 and f"separation {rows[1]['separation']:.3f}" in shown.output
