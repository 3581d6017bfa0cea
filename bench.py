"""`make bench`: fracgen's renderer against a plain NumPy/Python chaos game, and the trainer's loader.

Everything runs in this one process, one core at a time (plus one line with all cores), on the
same systems: the 1p-frac defaults (2 maps, 100k points, 512 px, random 3x3 patches, grayscale).
fracgen's rows are timed in several blocks and show the best block and the median: on a shared
VM a neighbour can take half a core for minutes, and the best block is what the code does on a
core of its own. Prints tables; copy them into the README with the machine they came from.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import tempfile
import time
import zlib

import numpy as np
from PIL import Image

from fracgen import png
from fracgen.dataset import Settings, render_dataset
from fracgen.ifs import perturb, sample_sigma_system
from fracgen.render import render
from fracgen.rng import derive_seed


def plain_render(coef: np.ndarray, probabilities: np.ndarray, points: int, size: int = 512, pad: int = 6):
    """The chaos game written the obvious way, with the reference generator's drawing rules."""
    x, y, xs, ys = 0.0, 0.0, [], []
    maps = [tuple(row) for row in coef]
    for _ in range(points):
        a, b, c, d, e, f = random.choices(maps, weights=probabilities)[0]
        x, y = a * x + b * y + e, c * x + d * y + f
        xs.append(x)
        ys.append(y)
    xs, ys = np.array(xs), np.array(ys)
    px = ((xs - xs.min()) / (xs.max() - xs.min()) * (size - 2 * pad) + pad).astype(int)
    py = ((ys - ys.min()) / (ys.max() - ys.min()) * (size - 2 * pad) + pad).astype(int)
    image = np.zeros((size, size), dtype=np.uint8)
    for u, v in zip(px, py, strict=True):
        mask = random.randint(1, 511)
        image[v : v + 3, u : u + 3] = np.array([(mask >> i) & 1 for i in range(9)]).reshape(3, 3) * 127
    return image[::-1]


def timed(fn, n: int, blocks: int = 1) -> list[float]:
    """Seconds per call in each of `blocks` blocks of n // blocks calls, after one warm-up call."""
    fn(0)
    per_block, out, i = max(1, n // blocks), [], 1
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn(i)
            i += 1
        out.append((time.perf_counter() - t0) / per_block)
    return out


def row(table, name, sec_per_image: list[float], points, baseline=None, note=""):
    """One table row: images/s of the best block (and the median when there are several)."""
    best, median = min(sec_per_image), statistics.median(sec_per_image)
    if best >= 0.1:  # the plain version: one block, about a second per image
        rate = f"{1 / best:,.1f}"
    else:
        rate = f"{1 / best:,.0f}" + (f" ({1 / median:,.0f})" if len(sec_per_image) > 1 else "")
    ratio = f"{baseline / best:,.0f}x" if baseline else ""
    table.append((name, rate, f"{points / best / 1e6:,.1f}", ratio, note))


def bench_renderer(n: int, plain_n: int, points: int, size: int, blocks: int, e2e_runs: int) -> list[tuple]:
    base, _ = sample_sigma_system(3.5, 2, derive_seed(0, 1, 0))
    systems = [perturb(base, 0.1, "scale", derive_seed(0, 2, k, 0))[0] for k in range(64)]
    table: list[tuple] = []

    def plain(i):
        s = systems[i % len(systems)]
        return plain_render(s.coef, s.probabilities, points, size)

    t_plain = min(timed(plain, plain_n))
    row(table, "plain Python/NumPy, render only", [t_plain], points)

    def plain_e2e(i):
        buf = io.BytesIO()
        Image.fromarray(plain(i).copy()).save(buf, format="PNG")
        return buf

    t_plain_e2e = min(timed(plain_e2e, plain_n))
    row(table, "plain + Pillow PNG (default level)", [t_plain_e2e], points)

    rows = png.row_buffer(size)

    def render_only(i):  # sample the perturbation, chaos game, rasterise, fill check
        s, _ = perturb(base, 0.1, "scale", derive_seed(0, 2, i, 0))
        _, fill = render(s, derive_seed(0, 3, i), points=points, size=size, out=rows)
        return fill > 0.05

    row(table, "fracgen render only (1 core)", timed(render_only, n, blocks), points, t_plain,
        "perturb, chaos game, rasterise, fill check")

    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, os.cpu_count() or 1):
            s = Settings(classes=n, points=points, size=size, shard_size=100)
            render_dataset(os.path.join(tmp, "warm"), s, workers=workers, overwrite=True, classes=8)
            times = []
            for _ in range(e2e_runs):
                t0 = time.perf_counter()
                render_dataset(os.path.join(tmp, f"w{workers}"), s, workers=workers, overwrite=True)
                times.append((time.perf_counter() - t0) / n)
            label = f"fracgen end to end, {workers} worker{'s' if workers > 1 else ''}"
            note = "render, fill check, PNG, tar, sha256, manifest"
            row(table, label, times, points, t_plain_e2e, note if workers == 1 else f"{workers} processes, all cores")
    return table


def bench_scaling(counts: list[int], per_worker: int = 2000) -> list[tuple]:
    """End-to-end images/s for each worker count, with the work growing with the workers (weak scaling).
    Each count is timed after a small warm-up render with the same workers, so the pool's start-up
    (about 1 s: processes importing numba and loading the compiled kernels) is not in the figure."""
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for workers in counts:
            render_dataset(os.path.join(tmp, "warm"), Settings(classes=8 * workers, shard_size=4), workers=workers,
                           overwrite=True)
            n = per_worker * workers
            classes = min(1000, n)
            s = Settings(classes=classes, per_class=n // classes, shard_size=100)
            t0 = time.perf_counter()
            render_dataset(os.path.join(tmp, f"w{workers}"), s, workers=workers)
            rate = s.num_samples / (time.perf_counter() - t0)
            base = base or rate / counts[0]
            rows.append((str(workers), f"{s.num_samples:,}", f"{rate:,.0f}", f"{rate / workers:,.0f}",
                         f"{rate / base:.2f}x"))
    return rows


def bench_png(size: int) -> list[tuple]:
    base, _ = sample_sigma_system(3.5, 2, derive_seed(0, 1, 0))
    images = [render(perturb(base, 0.1, "scale", i)[0], i, size=size)[0].copy() for i in range(20)]
    rows = []
    for im in images:
        r = np.zeros((size, size + 1), np.uint8)
        r[:, 1:] = im
        rows.append(r)
    out = []

    def measure(name, fn):
        fn(0)
        t0 = time.perf_counter()
        sizes = [len(fn(i)) for i in range(len(images))]
        out.append((name, f"{(time.perf_counter() - t0) / len(images) * 1e3:.3f}", f"{np.mean(sizes) / 1e3:.1f}"))

    for level in (1, 6):
        def pillow(i, level=level):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG", compress_level=level)
            return buf.getvalue()
        measure(f"Pillow PNG, zlib level {level}", pillow)
    for level in (1, 6):
        measure(f"raw rows + zlib level {level}", lambda i, level=level: zlib.compress(rows[i].tobytes(), level))
    for level in png.LEVELS:
        measure(f"fracgen.png: raw rows + ISA-L level {level}", lambda i, level=level: png.encode_rows(rows[i], level))
    return out


def bench_trainer(args) -> None:
    """The trainer's rows: data paths against the model alone, augmentation per batch, PIL loader alone."""
    from train import bench as tb

    what = ("CPU preset trained through (real pretrain runs, 1000 classes at 128 px)" if args.preset == "cpu" else
            "paper preset trained through (real pretrain runs, 1p-frac at 512 px; streamed set larger)")
    print(f"\n| {what} | samples/s | of the fast model-only rate | MFU (bf16 peak) | peak device MiB | note |"
          "\n|---|---|---|---|---|---|")
    for r in tb.training_rows(args.preset, args.train_steps, stream_images=args.stream_images,
                              compile_modes=tuple(args.compile_modes.split(",")), repeats=args.repeats,
                              precisions=tuple(args.precisions.split(",")) if args.precisions else None,
                              paths=tuple(args.paths.split(",")) if args.paths else None):
        print("| " + " | ".join(r) + " |")
    if args.training_only:
        return
    if args.preset == "cpu":
        print("\n| CPU preset, in-memory step, inside each run | ms making the batch | ms of the step | left for the "
              "model |\n|---|---|---|---|")
        for r in tb.batch_share_rows(precisions=tuple(args.precisions.split(",")) if args.precisions else None,
                                     repeats=args.repeats):
            print("| " + " | ".join(r) + " |")
    print("\n| paper preset augmentation, one batch of 256 (512 px -> 224 px, RandAugment m9 inc1, erasing 0.5) | "
          "ms/batch | device |\n|---|---|---|")
    for r in tb.augmentation_rows():
        print("| " + " | ".join(r) + " |")
    print("\n| device memory, in-memory path | MiB | note |\n|---|---|---|")
    for r in tb.memory_rows():
        print("| " + " | ".join(r) + " |")
    print("\n| trainer data loader, PIL path (from shards) | samples/s | note |\n|---|---|---|")
    for r in tb.loader_throughput(args.loader_seconds):
        print("| " + " | ".join(r) + " |")
    bench_onthefly(args)


def bench_pull(shards: int = 100, jobs: tuple[int, ...] = (1, 2, 4, 8), latencies: tuple[float, ...] = (0.0, 0.05),
               images_per_shard: int = 10) -> list[tuple]:
    """`fracgen pull` of a `shards`-shard folder from an HTTP server on loopback, `jobs` files at a time. Each
    latency is added before a shard's first byte, as a server far away adds it (0: loopback as it is)."""
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from fracgen import share

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "source")
        render_dataset(source, Settings(classes=shards * images_per_shard, shard_size=images_per_shard),
                       workers=os.cpu_count() or 1)
        megabytes = sum(os.path.getsize(os.path.join(source, f)) for f in os.listdir(source)
                        if f.endswith(".tar")) / 1e6
        for latency in latencies:
            class Far(SimpleHTTPRequestHandler):
                first_byte_after = latency

                def do_GET(self):
                    if self.path.endswith(".tar"):
                        time.sleep(self.first_byte_after)
                    super().do_GET()

                def log_message(self, *args):
                    pass

            server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Far, directory=source))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            try:
                first = None
                for n in jobs:
                    dest = os.path.join(tmp, f"pulled-{latency}-{n}")
                    t0 = time.perf_counter()
                    share.pull(f"http://127.0.0.1:{server.server_address[1]}/", dest, jobs=n)
                    seconds = time.perf_counter() - t0
                    first = first or seconds
                    rows.append((f"{latency * 1000:.0f} ms", str(n), f"{seconds:.3f}", f"{megabytes / seconds:.1f}",
                                 f"{first / seconds:.2f}x"))
            finally:
                server.shutdown()
                server.server_close()
    return rows


def bench_onthefly(args) -> None:
    """uint8 samples/s of one loader process: rendered on the fly against read and decoded from shards."""
    from train import bench as tb

    print("\n| one loader worker, uint8 samples for | data | on the fly, samples/s | from shards, samples/s | ratio |"
          "\n|---|---|---|---|---|")
    for r in tb.onthefly_rows(args.loader_seconds):
        print("| " + " | ".join(r) + " |")


def bench_checkpoint(args) -> None:
    """What a checkpoint of the preset's state costs the step (the copy) and its thread (the write)."""
    from train import bench as tb

    print("\n| checkpoint of | MiB | ms the step waits (copy to host) | ms on the writer's thread (serialise, hash, "
          "fsync, rename) |\n|---|---|---|---|")
    for preset in ("cpu", "paper"):
        for r in tb.checkpoint_rows(preset):
            print("| " + " | ".join(r) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=2000, help="images for fracgen's timings")
    ap.add_argument("--blocks", type=int, default=10, help="blocks the render-only images are timed in")
    ap.add_argument("--e2e-runs", type=int, default=3, help="timed end-to-end renders per worker count")
    ap.add_argument("--plain-images", type=int, default=3, help="images for the plain version (about 1 s each)")
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--loader-seconds", type=float, default=10.0)
    ap.add_argument("--train-steps", type=int, default=100, help="steps of each timed pre-training run")
    ap.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                    help="trainer rows for this preset (paper: for a GPU machine)")
    ap.add_argument("--compile-modes", default="default",
                    help="torch.compile modes of the fast model-only rows, comma-separated (CUDA only; the data "
                         "paths use the first), e.g. default,reduce-overhead")
    ap.add_argument("--repeats", type=int, default=1,
                    help="measure each training row this many times, round-robin, and report the median (a VM whose "
                         "speed drifts moves every row alike)")
    ap.add_argument("--stream-images", type=int, default=20_000, help="images of the streamed set (paper preset)")
    ap.add_argument("--precisions", help="CPU trainer rows at these precisions only, e.g. bf16 (default: fp32 and, "
                                         "where the CPU has bf16 units, bf16)")
    ap.add_argument("--paths", help="trainer rows of these data paths only (with the model-only rows), comma-"
                                    "separated: memory, stream, pil, fly")
    ap.add_argument("--scaling", metavar="1,2,4", help="only the end-to-end scaling over these worker counts")
    ap.add_argument("--only", choices=("renderer", "pull", "trainer", "onthefly", "checkpoint", "profile"),
                    help="only fracgen's rows, only `fracgen pull` 1 vs N files at once, only the trainer's, only the "
                         "on-the-fly source against shards, only "
                         "what a checkpoint costs the training loop, or a profile of the preset's in-memory step "
                         "(on CUDA with a check that no step waits for the device)")
    ap.add_argument("--training-only", action="store_true", help="the trainer's training rows only (not the "
                                                                  "batch share, augmentation, memory and loader rows)")
    ap.add_argument("--profile-images", type=int, default=0, help="classes of the profiled set (default: the "
                                                                   "preset's)")
    args = ap.parse_args()
    if args.scaling:
        print("| workers | images | images/s | per worker | speed-up |\n|---|---|---|---|---|")
        for r in bench_scaling([int(w) for w in args.scaling.split(",")]):
            print("| " + " | ".join(r) + " |")
        return
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    if args.only == "onthefly":
        bench_onthefly(args)
        return
    if args.only == "checkpoint":
        bench_checkpoint(args)
        return
    if args.only in (None, "pull"):
        print("\n| pull of 100 shards over loopback, first byte after | files at once (--jobs) | seconds | MB/s | "
              "vs 1 |\n|---|---|---|---|---|")
        for r in bench_pull():
            print("| " + " | ".join(r) + " |")
        if args.only == "pull":
            return
    if args.only == "profile":
        from train import bench as tb

        for line in tb.step_checks(args.preset, images=args.profile_images):
            print(line)
        return
    if args.only != "trainer":
        print(f"# 1p-frac defaults: 2 maps, {args.points} points, {args.size} px, random 3x3 patches\n")
        print("| what | images/s, best (median) | Mpoints/s, best | vs plain | note |\n|---|---|---|---|---|")
        for r in bench_renderer(args.images, args.plain_images, args.points, args.size, args.blocks, args.e2e_runs):
            print("| " + " | ".join(r) + " |")
        print("\n| PNG encoder (512 px 1p-frac image) | ms/image | KB/image |\n|---|---|---|")
        for r in bench_png(args.size):
            print("| " + " | ".join(r) + " |")
    if args.only != "renderer":
        bench_trainer(args)


if __name__ == "__main__":
    main()
