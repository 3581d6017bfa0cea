"""The data paths of a pre-training run behind one interface: each hands the training loop micro-batches on the
device, ready for the model, and the clean images its pretext accuracy is measured on.

| path   | where the pixels come from                                            | who augments         |
|--------|-----------------------------------------------------------------------|----------------------|
| memory | one uint8 tensor on the device (decoded shards or rendered on the fly) | the device, batched  |
| stream | shards read and decoded by loader workers                              | the device, batched  |
| render | rendered by loader workers (`--render`, a set too large to hold)       | the device, batched  |
| pil    | shards read, decoded and augmented by loader workers (`--augment cpu`) | PIL, in the workers  |

`read_run_data` reads what a run trains on, `open_data` is the one place that picks a path, and `Feed` hands the
step what the path gives (nothing on the in-memory path, whose batches the step draws itself); the training loop
knows none of them apart.
"""

from __future__ import annotations

import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fracgen.errors import FracgenError

from . import data, onthefly
from .augment import HostCrop
from .runtime import TrainError
from .source import resolve_shards

GiB = 1024**3
_CROPPING = " and cutting crops"


@dataclass
class RunData:
    """What a run trains on: the manifest, and the shards (or the manifest alone with `--render`)."""

    manifest: dict
    source: str  # "--shards X" or "--render X", for messages
    shards_dir: Path | None = None  # None with --render
    urls: tuple[str, ...] = ()
    instances: int = 0  # with --render: instances per class; 0: a fresh instance of every class every epoch
    images: int | None = None  # distinct images the run draws; None: no end
    epoch_images: int = 0  # images in one pass (what warm-up epochs count)

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]


def read_run_data(cfg, local_rank: int = 0, log: Callable[[str], None] = print) -> RunData:
    """The manifest of --render, or of --shards (pulled into the cache first when it is a URL)."""
    if cfg.render:
        manifest = onthefly.read_manifest(Path(cfg.render))
        instances = manifest["settings"]["per_class"] if cfg.instances < 0 else cfg.instances
        images = manifest["num_classes"] * instances or None
        return RunData(manifest, f"--render {cfg.render}", instances=instances, images=images,
                       epoch_images=images or manifest["num_classes"])
    shards_dir = resolve_shards(cfg.shards, cfg.cache_dir, local_rank, log=log)
    manifest = data.read_manifest(shards_dir)
    return RunData(manifest, f"--shards {cfg.shards}", shards_dir, tuple(data.shard_urls(shards_dir, manifest)),
                   images=manifest["num_samples"], epoch_images=manifest["num_samples"])


def cache_budget(cfg, device) -> int:
    """Bytes the decoded set may take on this rank: --cache-budget, else a quarter of the device's memory
    (on the CPU, of the memory available now, shared by the ranks of this node)."""
    if cfg.cache_budget:
        return int(cfg.cache_budget * GiB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: assume 16 GiB free
        available = 16 * GiB
    return available // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def choose_data_path(cfg, manifest: dict, device, images: int | None = None) -> tuple[str, str]:
    """("memory" | "stream" | "pil", why): which way the images reach the model. `images`: how many distinct images
    the run draws (default: the shard folder's; None with --render --instances 0: no end)."""
    if cfg.augment == "cpu":
        if cfg.render:
            raise TrainError("--render needs --augment device (the PIL path reads shards)")
        if cfg.cache == "on":
            raise TrainError("--cache on needs --augment device (the PIL path streams and augments in workers)")
        return "pil", "--augment cpu"
    if cfg.render and images is None:
        if cfg.cache == "on":
            raise TrainError("--cache on needs a finite --instances: --instances 0 draws a fresh instance every "
                             "epoch, which no cache holds")
        return "stream", "--instances 0: a fresh instance of every class every epoch"
    images = manifest["num_samples"] if images is None else images
    need, budget = images * data.image_size(manifest) ** 2, cache_budget(cfg, device)
    fits = need <= budget
    if cfg.cache == "on" and not fits:
        raise TrainError(f"--cache on: the decoded set needs {need / GiB:.2f} GiB ({images} images of "
                         f"{data.image_size(manifest)}^2 bytes) per rank, more than the cache budget of "
                         f"{budget / GiB:.2f} GiB; raise --cache-budget or stream it with --cache off")
    why = f"decoded set {need / GiB:.3g} GiB, cache budget {budget / GiB:.3g} GiB"
    if cfg.cache == "off" or (cfg.cache == "auto" and not fits):
        return "stream", why + ("" if cfg.cache == "off" else ": too large to hold")
    return "memory", why


class DataPath:
    """One way the pixels reach the run. `raw(first, last)`: micro-batches [first, last) of this rank as (uint8
    (B, 1, H, W), labels), or model-ready float images where `augmented` (the in-memory path has none: the step
    draws from its `source`); `eval_batches()`: (uint8 images, labels) of the clean set the pretext accuracy is
    measured on; `how`: one line for the log."""

    name = ""
    augmented = False
    cropped = False  # the loader workers cut the crops (`train.augment.HostCrop`); the device does the rest
    how = ""

    def raw(self, first: int, last: int):
        raise NotImplementedError

    def eval_batches(self):
        raise NotImplementedError

    def example(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A raw micro-batch of the shapes `raw` gives, on `device` (zeros): what the step's compile is tried on."""
        if self.augmented:
            size = self.cfg.img_size
            return torch.zeros(batch, 3, size, size, device=device), torch.zeros(batch, dtype=torch.int64,
                                                                                 device=device)
        size = self.cfg.img_size if self.cropped else data.image_size(self.run.manifest)
        return (torch.zeros(batch, 1, size, size, dtype=torch.uint8, device=device),
                torch.zeros(batch, dtype=torch.int64, device=device))


class MemoryPath(DataPath):
    """The whole set on the device, batches drawn by index: micro-batch t is a pure function of (seed, t, rank), so a
    resumed run continues exactly."""

    name = "memory"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, seed: int, rank: int,
                 world_size: int, eval_samples: int, made: str):
        self.images, self.labels, self.eval_samples = images, labels, eval_samples
        self.source = data.MemorySource(images, labels, batch, seed, rank, world_size)
        self.how = (f"in-memory cache on {images.device.type}: {len(labels)} images, {images.numel() / 2**20:.0f} "
                    f"MiB, {made}; augmentation on the device, no loader processes")

    def example(self, batch: int, device) -> None:
        return None  # the step draws its batches from the counter

    def eval_batches(self):
        n = min(self.eval_samples, len(self.labels))
        return ((self.images[i:i + 256], self.labels[i:i + 256]) for i in range(0, n, 256))


class StreamPath(DataPath):
    """Shards streamed by loader workers that only decode (`augmented` False) or also augment with PIL (the `pil`
    path). The stream seed includes the start step, so a resumed run draws new samples instead of replaying."""

    def __init__(self, run: RunData, cfg, batch: int, step: int, pil: bool, crop=None):
        self.run, self.cfg, self.batch, self.crop = run, cfg, batch, crop
        self.seed = cfg.seed + 7919 * step
        self.name, self.augmented, self.cropped = ("pil", True, False) if pil else ("stream", False, crop is not None)
        shards = f"streaming {len(run.urls)} shards, {cfg.workers} loader worker(s)"
        self.how = f"{shards} decoding and augmenting with PIL" if pil else \
            f"{shards} decoding{_CROPPING if crop else ''}; augmentation on the device"

    def raw(self, first: int, last: int):
        cfg, urls = self.cfg, list(self.run.urls)
        if not self.augmented:
            return data.uint8_loader(urls, self.batch, last - first, self.seed, cfg.shuffle_buffer, cfg.workers,
                                     crop=self.crop)
        transform = data.train_transform(cfg.img_size, crop=cfg.crop, crop_scale=cfg.crop_scale, flip=cfg.flip,
                                         vflip=cfg.flip, randaug=cfg.randaug or None, reprob=cfg.reprob, gray=True,
                                         ink_gain=cfg.ink_gain)
        return data.train_loader(urls, self.batch, transform, last - first, self.seed, cfg.shuffle_buffer,
                                 cfg.workers)

    def eval_batches(self):
        return data.eval_images(list(self.run.urls), 256, self.cfg.eval_samples)


class RenderPath(DataPath):
    """Samples rendered by loader workers (`train.onthefly`): micro-batch t is a pure function of (seed, t, rank)
    for any number of workers."""

    name = "render"

    def __init__(self, run: RunData, cfg, batch: int, rank: int, world_size: int, crop=None):
        self.run, self.cfg, self.crop, self.cropped = run, cfg, crop, crop is not None
        self.draws = onthefly.Draws(run.num_classes, run.instances, batch, cfg.seed, rank, world_size)
        drawn = (f"{run.instances} instances per class" if run.instances else
                 "a fresh instance of every class every epoch")
        self.how = f"rendering on the fly, {cfg.workers} loader worker(s){_CROPPING if crop else ''}: {drawn}; " \
                   "augmentation on the device, no shards"

    def raw(self, first: int, last: int):
        return onthefly.loader(self.run.manifest, self.draws, first, last, self.cfg.workers, crop=self.crop)

    def eval_batches(self):
        return onthefly.eval_batches(self.run.manifest, min(self.cfg.eval_samples, self.run.epoch_images))


def crop_in_workers(cfg, device) -> bool:
    """`--crop-in workers|device|auto`: where the streamed paths cut their crops. auto: in the workers on CUDA,
    where moving whole images to the card costs more than cutting them (docs/speed.md); on the device elsewhere."""
    return cfg.crop_in == "workers" or (cfg.crop_in == "auto" and device.type == "cuda")


def open_data(cfg, run: RunData, device, batch: int, rank: int = 0, world_size: int = 1, step: int = 0,
              chosen: tuple[str, str] | None = None) -> tuple[DataPath, str]:
    """The data path of this run and why it was chosen: `chosen`, the caller's `choose_data_path` answer, or
    asked here."""
    path, why = chosen or choose_data_path(cfg, run.manifest, device, run.images)
    crop = None
    if path == "stream" and crop_in_workers(cfg, device):
        crop = HostCrop(cfg.img_size, crop=cfg.crop, scale=cfg.crop_scale, ink_gain=cfg.ink_gain)
    if path == "memory":
        t0 = time.time()
        if cfg.render:
            images, labels = onthefly.render_all(run.manifest, run.instances, cfg.workers)
            made = (f"rendered on the fly ({run.instances} per class) in {time.time() - t0:.1f} s by "
                    f"{cfg.workers or 'no'} loader worker(s)")
        else:
            images, labels = data.load_images(run.shards_dir, run.manifest)
            made = f"decoded in {time.time() - t0:.1f} s"
        return MemoryPath(images.to(device), labels.to(device), batch, cfg.seed, rank, world_size, cfg.eval_samples,
                          made), why
    if cfg.render:
        return RenderPath(run, cfg, batch, rank, world_size, crop), why
    return StreamPath(run, cfg, batch, step, pil=path == "pil", crop=crop), why


class PinnedRing:
    """Host batches handed over through `slots` reused buffers (pinned on CUDA), filled by a thread: no allocation
    per batch, and the copy out of the loader's shared memory runs beside the step. `next()` gives a filled slot
    (its `x`, `y`); `release(slot, event)` gives it back once `event` (the copy to the device) has completed.
    A loader error reaches `next()`; `close()` stops the thread and the loader."""

    class Slot:
        def __init__(self, x: torch.Tensor, y: torch.Tensor, pin: bool):
            self.x = torch.empty_like(x, pin_memory=pin)
            self.y = torch.empty_like(y, pin_memory=pin)
            self.event = None

    _END = object()

    def __init__(self, batches, slots: int = 3, pin: bool = True):
        self._batches, self._slots, self._pin = batches, slots, pin
        self._made = 0
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="fracgen-pinned-ring", daemon=True)
        self._thread.start()

    def _slot(self, x: torch.Tensor, y: torch.Tensor):
        if self._made < self._slots:
            self._made += 1
            return self.Slot(x, y, self._pin)
        slot = self._free.get()
        if slot is not None and slot.event is not None:
            slot.event.synchronize()  # this thread waits for the device's copy, not the training loop
        return slot

    def _fill(self) -> None:
        try:
            for x, y in self._batches:
                slot = self._slot(x, y)
                if slot is None or self._stop.is_set():
                    return
                if slot.x.shape != x.shape or slot.y.shape != y.shape:  # a batch of another shape: its own buffers
                    slot = self.Slot(x, y, self._pin)
                slot.x.copy_(x)
                slot.y.copy_(y)
                self._ready.put(slot)
            self._ready.put(self._END)
        except BaseException as e:  # a loader's error, handed to the training loop
            self._ready.put(e)
        finally:
            close = getattr(self._batches, "close", None)
            if close:
                close()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._ready.get()
        if item is self._END:
            self._ready.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def release(self, slot, event=None) -> None:
        slot.event = event
        self._free.put(slot)

    def close(self) -> None:
        self._stop.set()
        self._free.put(None)  # wakes a thread waiting for a slot
        self._thread.join(timeout=30)


class Feed:
    """What each micro-step takes besides its counter: nothing on the in-memory path (the step draws its own
    batches from the counter, on the device), else the path's next raw batch on the device, (uint8 images or
    model-ready ones, labels). On CUDA the loader's batches pass through a `PinnedRing` and are copied with
    `non_blocking`; on the CPU they are used where they are. Read errors become one line."""

    def __init__(self, path: DataPath, device, first: int, last: int, hint: str = ""):
        self.path, self.device, self.hint = path, device, hint
        self._raw = None if isinstance(path, MemoryPath) else path.raw(first, last)
        self._ring = PinnedRing(self._raw) if self._raw is not None and device.type == "cuda" else None
        self._it = iter(self._ring if self._ring is not None else (self._raw if self._raw is not None else ()))

    def take(self, n: int) -> list | None:
        """The next `n` micro-batches (None on the in-memory path)."""
        if self._raw is None:
            return None
        return [self._next() for _ in range(n)]

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            item = next(self._it)
        except StopIteration:
            raise TrainError("the loader ended before the run did") from None
        except (tarfile.TarError, OSError, EOFError, ValueError, FracgenError) as e:  # a shard changed mid-run
            # from a loader worker, torch's message is the worker's traceback: its last line says what happened
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            what = last[0].removeprefix(f"{type(e).__module__}.{type(e).__qualname__}: ")
            raise TrainError(f"reading the shards failed mid-run ({what[:200]}); check them with "
                             f"`fracgen verify {self.hint}`") from None
        if self._ring is None:
            return item
        x, y = item.x.to(self.device, non_blocking=True), item.y.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._ring.release(item, event)
        return x, y

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
        else:
            close = getattr(self._raw, "close", None)
            if close:
                close()
