"""`make bench` is not part of the test suite; this only checks that its pieces still run."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))

import bench  # noqa: E402


def _number(text: str) -> float:
    return float(text.split()[0].replace(",", "").rstrip("x"))


def test_bench_renderer_and_png_tables_run():
    """The rows agree with each other: Mpoints/s is images/s x points, 'vs plain' is the rate over the plain one's,
    the best block is at least the median; none of that is fixed by the inputs."""
    points = 2000
    table = bench.bench_renderer(n=4, plain_n=1, points=points, size=64, blocks=2, e2e_runs=2)
    names = [r[0] for r in table]
    assert names[0].startswith("plain") and any(n.startswith("fracgen render only") for n in names)
    plain, plain_e2e = _number(table[0][1]), _number(table[1][1])  # the end-to-end rows compare with plain + PNG
    for name, rate, mpoints, ratio, _ in table:
        best = _number(rate)
        assert best > 0 and _number(mpoints) == pytest.approx(best * points / 1e6, rel=0.06, abs=0.06), name
        if "(" in rate:  # best (median)
            assert best >= float(rate.split("(")[1].rstrip(")").replace(",", "")), name
        if ratio:
            baseline = plain_e2e if "end to end" in name else plain
            assert _number(ratio) == pytest.approx(best / baseline, rel=0.06, abs=1), name
    assert "(" in dict((r[0], r[1]) for r in table)["fracgen render only (1 core)"]
    png_rows = bench.bench_png(64)
    assert len(png_rows) == 8 and all(float(ms) > 0 and float(kb) > 0 for _, ms, kb in png_rows)
    sizes = {name: float(kb) for name, _, kb in png_rows}
    assert sizes["Pillow PNG, zlib level 6"] <= sizes["Pillow PNG, zlib level 1"]  # more effort, no larger files


def test_plain_render_follows_drawing_rules():
    import numpy as np

    coef = np.array([[0.5, 0, 0, 0.5, 0, 0], [0.5, 0, 0, 0.5, 0.5, 0], [0.5, 0, 0, 0.5, 0.25, 0.5]])
    image = bench.plain_render(coef, [1 / 3] * 3, 3000, size=64, pad=6)
    assert set(np.unique(image)) <= {0, 127} and image.any()
    cols = np.nonzero(image)[1]
    assert cols.min() >= 6 and cols.max() <= 64 - 6 + 2


def test_loader_throughput_reads_real_shards(tmp_path):
    from fracgen.dataset import Settings, render_dataset
    from train import data
    from train.bench import samples_per_second

    render_dataset(tmp_path, Settings(classes=40, size=64, points=5000, shard_size=20), workers=1)
    transform = data.train_transform(16, crop_scale=(0.35, 1.0), gray=True, ink_gain=2.0)
    rate = samples_per_second(tmp_path, transform, workers=0, seconds=0.5, batch=8)
    assert 0 < rate < 1e6  # batches were read and timed (a loader that yields nothing never returns)


def test_bench_scaling_table():
    rows = bench.bench_scaling([1, 2], per_worker=10)
    assert [r[0] for r in rows] == ["1", "2"] and [r[1] for r in rows] == ["10", "20"]
    assert rows[0][4] == "1.00x"
    first = _number(rows[0][2])
    for workers, _, rate, per_worker, speedup in rows:  # measured: per worker and speed-up follow from the rate
        assert _number(rate) > 0 and _number(per_worker) == pytest.approx(_number(rate) / int(workers), abs=1)
        assert _number(speedup) == pytest.approx(_number(rate) / first, rel=0.02, abs=0.01)


@pytest.mark.slow  # kept out of `make test` (10-minute budget); `make test-slow` runs it
def test_trainer_rows_run_every_data_path():
    from train.bench import _precision, training_rows
    from train.step import bf16_units

    rows = list(training_rows("cpu", steps=4, window=2, repeats=2))  # two rounds, round-robin over the rows
    precisions = ["fp32", "bf16"] if bf16_units() else ["fp32"]  # side by side where the CPU has bf16 units
    kinds = [r[0].split(" ")[0] for r in rows]
    assert kinds == ["model"] * len(precisions) + [k for k in ("in-memory", "in-memory", "streaming,", "PIL", "on")
                                                   for _ in precisions]
    assert [_precision(r[0]) for r in rows] == precisions * 6
    assert "eager step" in rows[len(precisions)][0] and "compiled" in rows[2 * len(precisions)][0]  # old, new
    assert all(float(r[1].replace(",", "")) > 0 for r in rows) and all(r[2] == "100%" for r in rows[:len(precisions)])
    reference = {_precision(r[0]): _number(r[1]) for r in rows[:len(precisions)]}
    for r in rows[len(precisions):]:  # each share is its rate over model-only's in the same precision
        rate, ref = _number(r[1]), reference[_precision(r[0])]
        # the printed rates are rounded to whole samples/s: at the tens a busy machine gives, that moves the share
        assert _number(r[2].rstrip("%")) == pytest.approx(100 * rate / ref, abs=1 + 50 * (1 / rate + 1 / ref))
    assert all(r[5].endswith("; median of 2 rounds") for r in rows)
    assert all(r[3] == "-" and r[4] == "-" for r in rows)  # no MFU nor device memory on a CPU
    notes = {r[0].split(" ")[0]: r[5] for r in rows}
    assert "in-memory cache" in notes["in-memory"] and "with PIL" in notes["PIL"] and "on the fly" in notes["on"]


def test_onthefly_rows_compare_rendering_with_reading_shards(monkeypatch):
    from fracgen.dataset import Settings
    from train import bench as tb

    monkeypatch.setattr(tb, "ON_THE_FLY", [("tiny", Settings(classes=20, size=64, points=3000, shard_size=10))])
    (row,) = tb.onthefly_rows(seconds=0.3, batch=8)
    assert row[:2] == ("tiny", "64 px, 3,000 points")
    assert all(float(v.replace(",", "").rstrip("x")) > 0 for v in row[2:])
    assert _number(row[4]) == pytest.approx(_number(row[2]) / _number(row[3]), rel=0.02, abs=0.01)


def test_checkpoint_rows_time_the_copy_and_the_write():
    from train.bench import checkpoint_rows

    ((what, mib, copy_ms, write_ms),) = checkpoint_rows("cpu", repeats=1)
    assert what.startswith("cpu preset") and 20 < _number(mib) < 60  # ViT-Tiny depth 6 + AdamW moments, float32
    assert _number(copy_ms) >= 0 and _number(write_ms) > 0


@pytest.mark.slow  # four short CPU-preset runs
def test_batch_share_rows_time_the_batch_inside_the_step():
    from train.bench import batch_share_rows

    rows = batch_share_rows(steps=24, precisions=("fp32",))
    assert [r[0] for r in rows] == ["fp32, batch eager (`--fast off`)", "fp32, batch compiled whole (`--fast on`)"]
    for _, batch_ms, step_ms, left in rows:  # the batch is part of the step; the share follows from the two
        assert 0 < _number(batch_ms) < _number(step_ms)
        assert _number(left.rstrip("%")) == pytest.approx(100 * (1 - _number(batch_ms) / _number(step_ms)), abs=0.2)


def test_bench_pull_rows_agree_with_themselves():
    """Every row pulled the whole folder (its MB/s is size / seconds, the same size in each row), and 'vs 1' is the
    one-at-a-time time over the row's."""
    rows = bench.bench_pull(shards=4, jobs=(1, 2), latencies=(0.0, 0.02), images_per_shard=2)
    assert [(r[0], r[1]) for r in rows] == [("0 ms", "1"), ("0 ms", "2"), ("20 ms", "1"), ("20 ms", "2")]
    sizes = {round(float(r[2]) * float(r[3]), 1) for r in rows}
    assert max(sizes) - min(sizes) <= 0.05 * max(sizes) + 0.1
    for first, second in (rows[0:2], rows[2:4]):
        assert first[4] == "1.00x"
        assert _number(second[4]) == pytest.approx(float(first[2]) / float(second[2]), rel=0.05, abs=0.02)
