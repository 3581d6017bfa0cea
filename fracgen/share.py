"""Sharing a rendered folder: `publish` writes a dataset card and SHA256SUMS beside the shards (and may upload the
folder to a Hugging Face dataset repository); `pull` fetches a published folder into a local one, trusting nothing
it has not checked against the manifest's sizes and sha256s.

A source is a local folder, the http(s) URL of a published folder (or of its manifest.json), or
`hf://datasets/ORG/NAME[@REVISION]`. Every file is fetched by one piece of code: over HTTP with urllib from the
standard library, which is all a GET with retries needs; `requests` is not one of our dependencies, and adding it
for this would put a second HTTP stack under the one path whose bytes we must vouch for. A hub source is an HTTP
source whose file URLs come from `huggingface_hub.hf_hub_url` (its token, from HF_TOKEN or `hf auth login`, is sent
to the hub's host only, never to the storage host it redirects to).

A pull writes each shard under a hidden temporary name while hashing it and renames it into place only when its
size and sha256 are the manifest's; the manifest itself is written last, so a folder that has one is complete.
`source.json` beside it says where the data came from.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.client
import io
import json
import math
import os
import queue
import re
import shlex
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from fracgen import s3
from fracgen.dataset import MANIFEST, verify_dataset
from fracgen.errors import FracgenError
from fracgen.lock import LOCK_NAME, FolderLock, writing_folder
from fracgen.manifest import (
    CARD,
    FORMAT_VERSION,
    PREVIEW,
    PUBLISH_MARK,
    SUMS,
    TIMM_INFO,
    card_front_matter,
    card_pattern,
    check_manifest,
    load_manifest,
    other_renderer,
    write_readers_files,
    write_timm_info,
)
from fracgen.preview import contact_sheet
from fracgen.shards import atomic_write, check_shard_contents, file_sha256, matches
from fracgen.untrusted import MAX_JSON_BYTES, parse_json, printable, read_json, redact
from fracgen.version import __version__

SOURCE_FILE = "source.json"  # where a pulled folder came from
JOBS = 8  # files fetched at once by default (aws s3 sync asks 10 at a time, hf download 8)
MAX_JOBS = 64
TRIES = 5  # attempts per file on transient errors (connection, timeout, too slow, HTTP 429 and 5xx)
BACKOFF = 0.5  # seconds before the second attempt, doubled for each further one
MAX_WAIT = 10.0  # the most a server's Retry-After may make us wait (it made a file wait 4 minutes at 60 s)
RATE_WINDOW = 10.0  # seconds over which a transfer's rate is measured against Limits.min_rate
CHUNK = 1 << 20
RESERVE = 1 << 28  # bytes a pull leaves free on the disk it fills


@dataclass(frozen=True)
class Limits:
    """What a source may cost: a server that sends forever, slowly or not at all ends in one line, naming the file."""

    timeout: float = 30.0  # seconds a connection may stay silent (connecting, or between two reads)
    min_rate: float = 10_000.0  # bytes/s each transfer must average over every RATE_WINDOW seconds
    deadline: float = 900.0  # seconds one file may take, its retries and their waits included

    def check(self) -> Limits:
        if not (self.timeout > 0 and self.min_rate >= 0 and self.deadline > 0):
            raise FracgenError(f"--timeout and --deadline must be > 0 and --min-rate >= 0, got {self.timeout}, "
                               f"{self.deadline} and {self.min_rate}")
        return self
HF_PATTERN = re.compile(r"hf://datasets/([A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@([^@]+))?/?")
Progress = Callable[[str, int, int], None]  # (phase "check" or "fetch", bytes done, bytes in all)
Note = Callable[[str], None]


class _Transient(Exception):
    """A failure worth another try: the network, a timeout, a busy server."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.wait = wait


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, but drops the Authorization header when the host changes (the hub sends
    large files from a storage host that must not see the token), and remembers the hub's X-Repo-Commit."""

    def __init__(self):
        self.commit: str | None = None

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.commit = headers.get("X-Repo-Commit") or self.commit
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):  # urllib would follow ftp:// (and wait minutes on a peer that is not FTP)
            raise FracgenError(f"{redact(req.full_url)}: the server redirects to a {scheme or 'relative'}:// URL; "
                               "fracgen follows redirects to http(s) only")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).netloc != urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _retry_after(headers) -> float | None:
    try:
        return min(MAX_WAIT, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


@dataclass
class Source:
    """Where a published folder lives: `kind` folder (a path), http (a base URL ending in /) or hf (a repo id)."""

    spec: str  # as the user wrote it, less the secrets a URL may carry (see untrusted.redact)
    kind: str
    base: str
    revision: str | None = None  # hf: the branch, tag or commit asked for
    commit: str | None = None  # hf: the commit that revision pointed to when the manifest was fetched
    token: str | None = field(default=None, repr=False)
    seen_commit: str | None = None  # hf: the X-Repo-Commit of the last response
    # http: the URL's query (a folder-wide signature such as an Azure SAS token): sent with every file of the folder,
    # never shown (url() leaves it out)
    query: str = field(default="", repr=False)

    def url(self, name: str) -> str:
        """The file's URL as it may be shown and recorded."""
        if self.kind == "folder":
            return str(Path(self.base) / name)
        if self.kind == "http":
            return urljoin(self.base, name)
        if self.kind == "s3":
            return f"s3://{self.base}{name}"
        return hub_url(self.base, name, "dataset", self.commit or self.revision)

    def request_url(self, name: str) -> str:
        """The URL asked for: url() with the folder's query; for s3://, a URL signed for this one GET."""
        if self.kind == "s3":
            bucket, _, prefix = self.base.partition("/")
            return s3.presign(bucket, prefix + name)
        url = self.url(name)
        return f"{url}?{self.query}" if self.query and self.kind == "http" else url

    def open(self, name: str, timeout: float = Limits.timeout):
        """A readable binary stream of one file; FracgenError when it is not there, _Transient when worth a retry.
        `timeout`: seconds the server may stay silent."""
        url = self.url(name)
        if self.kind == "folder":
            try:
                return open(url, "rb")  # noqa: SIM115 (the caller closes it)
            except FileNotFoundError:
                raise FracgenError(f"{url}: no such file in the source folder") from None
            except OSError as e:
                raise FracgenError(f"{url}: {e.strerror}") from None
        headers = {"User-Agent": f"fracgen/{__version__}"}
        if self.token and self.kind == "hf":
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.token:  # http://USER:PASSWORD@HOST/: urllib sends no login of its own (it took it for the host)
            headers["Authorization"] = f"Basic {self.token}"
        redirects = _Redirects()
        try:
            response = urllib.request.build_opener(redirects).open(
                urllib.request.Request(self.request_url(name), headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            body = e.read(4096) if self.kind == "s3" else b""
            e.close()
            if e.code == 429 or e.code >= 500:
                raise _Transient(f"HTTP {e.code} {e.reason}", _retry_after(e.headers)) from None
            hint = {404: " (not there: is this the URL of a published fracgen folder?)",
                    401: " (the server wants a login" + ("; set HF_TOKEN" if self.kind == "hf" else "") + ")",
                    403: " (access refused" + ("; does HF_TOKEN give access to it?" if self.kind == "hf" else "")
                         + ")"}.get(e.code, "")
            if 300 <= e.code < 400:  # urllib's reason spans three lines here
                hint = f" (a redirect loop, or more than {urllib.request.HTTPRedirectHandler.max_redirections} " \
                       "redirects)"
            if self.kind == "s3" and (said := s3.error_hint(body)):
                hint = f" ({said})"
            reason = (str(e.reason).splitlines() or [""])[0]
            raise FracgenError(f"{url}: HTTP {e.code} {reason}{hint}") from None
        except urllib.error.URLError as e:
            raise _Transient(str(e.reason)) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None
        self.seen_commit = response.headers.get("X-Repo-Commit") or redirects.commit
        return response


def is_remote(spec: str) -> bool:
    """True for a URL, hf:// or s3:// source; False for a local path."""
    return str(spec).startswith(("http://", "https://", "hf://", "s3://"))


def parse_hub(spec: str) -> tuple[str, str | None]:
    """(ORG/NAME, REVISION or None) of hf://datasets/ORG/NAME[@REVISION]."""
    match = HF_PATTERN.fullmatch(spec)
    if not match or not valid_repo_id(match.group(1)):
        raise FracgenError(f"{printable(spec)!r} is not hf://datasets/ORG/NAME[@REVISION] (fracgen shares data sets, "
                           "not models; ORG and NAME: letters, digits, '-', '_', '.', no '--' or '..', not starting "
                           "or ending with '-' or '.')")
    return match.group(1), match.group(2)


def valid_repo_id(repo: str) -> bool:
    """ORG/NAME as the hub accepts it (huggingface_hub's validate_repo_id, which answers with a long traceback)."""
    return len(repo) <= 96 * 2 + 1 and all(
        re.fullmatch(r"[\w.-]{1,96}", part) and not part.startswith(("-", ".")) and not part.endswith(("-", "."))
        and "--" not in part and ".." not in part for part in repo.split("/"))


def hub_url(repo: str, name: str, repo_type: str, revision: str | None) -> str:
    """huggingface_hub.hf_hub_url, its validation errors as one FracgenError line."""
    try:
        return _hub().hf_hub_url(repo, name, repo_type=repo_type, revision=revision)
    except ValueError as e:  # HFValidationError
        raise FracgenError(f"hf://{repo}@{revision}: {(str(e).splitlines() or ['not a valid name'])[0][:160]}") \
            from None


def _hub():
    """huggingface_hub, imported only when a hub source or destination is used (the `hub` extra)."""
    try:
        import huggingface_hub
    except ImportError:
        raise FracgenError("hf:// needs huggingface_hub: pip install 'fracgen[hub]' (or huggingface_hub)") from None
    return huggingface_hub


def open_source(spec: str) -> Source:
    spec = str(spec)
    if spec.startswith("hf://"):
        repo, revision = parse_hub(spec)
        return Source(spec, "hf", repo, revision or "main", token=_hub().get_token())
    if spec.startswith("s3://"):
        bucket, prefix = s3.parse(spec.removesuffix(MANIFEST) if spec.endswith("/" + MANIFEST) else spec)
        s3.check_credentials(spec)
        return Source(spec, "s3", f"{bucket}/{prefix}")
    if spec.startswith(("http://", "https://")):
        parts = urlsplit(spec)
        if not parts.netloc:
            raise FracgenError(f"{spec!r} is not a URL with a host")
        base = spec.split("?", 1)[0].split("#", 1)[0]
        query = parts.query
        if base.endswith("/" + MANIFEST):
            base = base[: -len(MANIFEST)]
        elif not base.endswith("/"):
            base += "/"  # the folder's URL: its files are relative to it
        token = None
        if "@" in parts.netloc:  # the login leaves the URL (which is printed and stored) for a header
            login, _, host = parts.netloc.rpartition("@")
            token = base64.b64encode(unquote(login).encode()).decode()
            base = urlunsplit(urlsplit(base)._replace(netloc=host))
        return Source(redact(spec), "http", base, token=token, query=query)
    if "://" in spec:
        raise FracgenError(f"{spec!r}: a source is a folder, an http(s):// URL, s3://BUCKET/PREFIX/ or "
                           "hf://datasets/ORG/NAME")
    folder = Path(spec)
    if not folder.is_dir():
        raise FracgenError(f"source folder {spec} does not exist")
    return Source(spec, "folder", str(folder))


def _download(source: Source, name: str, f, limit: int, on_bytes: Callable[[int], None],
              note: Note | None, limits: Limits = Limits(), what: str = "the manifest lists") -> tuple[str, int]:
    """Stream one file into the binary file `f` (emptied first), hashing it; retry transient failures from the
    start (the hash must cover bytes of one response), each retry a `note`; return (sha256, size). More than
    `limit` bytes is an error (`what`: who set the limit); so is a transfer slower than `limits` allow (retried) or
    one past their deadline (not retried)."""
    url = source.url(name)
    end, last = time.monotonic() + limits.deadline, ""
    for attempt in range(1, TRIES + 1):
        f.seek(0)
        f.truncate()
        sha, size = hashlib.sha256(), 0
        try:
            with source.open(name, min(limits.timeout, max(0.1, end - time.monotonic()))) as response:
                window, window_size = time.monotonic(), 0
                # read1: whatever has arrived (read(n) waits for all n bytes, so a trickle never timed out)
                while chunk := response.read1(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise FracgenError(f"{url}: more than the {limit:,} bytes {what}: damaged or replaced at "
                                           "the source; nothing was kept")
                    sha.update(chunk)
                    f.write(chunk)
                    on_bytes(len(chunk))
                    now, window_size = time.monotonic(), window_size + len(chunk)
                    if now > end:
                        raise _Deadline(f"{size:,} of {limit:,} bytes")
                    if now - window >= RATE_WINDOW:
                        if window_size / (now - window) < limits.min_rate:
                            raise _Transient(f"{window_size / (now - window):,.0f} bytes/s, below the "
                                             f"--min-rate of {limits.min_rate:,.0f}")
                        window, window_size = now, 0
            return sha.hexdigest(), size
        except _Deadline as e:
            raise FracgenError(f"{url}: not finished within the --deadline of {limits.deadline:g} s ({e}{last}); "
                               "nothing was kept") from None
        except (_Transient, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            on_bytes(-size)
            reason = str(e) or type(e).__name__
            last = f"; the try before: {reason}"
            wait = max(BACKOFF * 2 ** (attempt - 1), getattr(e, "wait", None) or 0)
            if attempt == TRIES or time.monotonic() + wait >= end:
                within = f"gave up after {attempt} tries" if attempt == TRIES else \
                    f"gave up after {attempt} tries: the --deadline of {limits.deadline:g} s comes first"
                raise FracgenError(f"{url}: {reason} ({within})") from None
            if note:
                note(f"{url}: {reason}; trying again in {wait:.1f} s ({attempt + 1} of {TRIES})")
            time.sleep(wait)
    raise AssertionError("unreachable")


class _Deadline(Exception):
    """A file took longer than Limits.deadline (not retried: the deadline covers every try)."""


@dataclass(frozen=True)
class RemoteManifest:
    data: bytes  # the manifest's bytes, as the source serves them
    manifest: dict
    sha256: str  # of `data`: names the data set (the training cache is keyed by it)


def fetch_manifest(source: Source, note: Note | None = None, limits: Limits = Limits()) -> RemoteManifest:
    """The source's manifest, checked: fracgen's schema, our format version, a finished render. A hub source is
    pinned to the commit that served it, so every shard comes from the same revision as the manifest."""
    url = source.url(MANIFEST)
    buf = io.BytesIO()
    _download(source, MANIFEST, buf, MAX_JSON_BYTES, lambda n: None, note, limits)
    data = buf.getvalue()
    manifest = parse_json(data, f"{url} (not a fracgen manifest)")
    check_manifest(manifest, url)
    if manifest["format_version"] != FORMAT_VERSION:
        raise FracgenError(f"{url} has shard format_version {manifest['format_version']}, this fracgen reads "
                           f"{FORMAT_VERSION}; pull it with the fracgen that wrote it "
                           f"({manifest.get('fracgen_version')})")
    if not manifest["complete"]:
        raise FracgenError(f"{url} says its render did not finish: only finished folders can be pulled")
    if not manifest["shards"]:
        raise FracgenError(f"{url} lists no shards")
    if source.kind == "hf" and source.seen_commit and source.commit is None:
        source.commit = source.seen_commit
    if note and other_renderer(manifest):
        note(f"{url} was {other_renderer(manifest)}: the shards are checked by sha256 all the same")
    elif note and manifest.get("fracgen_version") != __version__:
        note(f"{url} was written by fracgen {manifest.get('fracgen_version')}, this is fracgen {__version__} (the "
             "same renderer: the same images)")
    return RemoteManifest(data, manifest, hashlib.sha256(data).hexdigest())


@dataclass
class PullResult:
    folder: Path
    manifest: dict
    source: Source
    fetched: list[str]  # shards downloaded by this run
    fetched_bytes: int
    kept: int  # shards already in the folder with the manifest's size and sha256


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj: dict) -> None:
    text = (json.dumps(obj, indent=1) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


def pull(source: str | Source, out: str | Path, *, overwrite: bool = False, remote: RemoteManifest | None = None,
         progress: Progress | None = None, note: Note | None = None, command: str | None = None,
         limits: Limits = Limits(), jobs: int = JOBS) -> PullResult:
    """Fetch a published folder into `out` (see the module docstring); return what was done. Shards already in
    `out` with the manifest's size and sha256 are kept, so a killed pull run again fetches only what is missing.
    One writer per folder: the run holds `out`'s lock (FolderLock). `remote`: its manifest, if already fetched.
    `jobs`: shards fetched at once, each checked as when alone."""
    src = source if isinstance(source, Source) else open_source(source)
    out = Path(out)
    if src.kind == "folder" and out.exists() and Path(src.base).resolve() == out.resolve():
        raise FracgenError(f"{out} is the source folder itself")
    limits.check()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_JOBS:
        raise FracgenError(f"--jobs must be in 1..{MAX_JOBS}, got {jobs}")
    remote = remote or fetch_manifest(src, note, limits)
    with writing_folder(out, command or f"fracgen pull {shlex.quote(src.spec)} {shlex.quote(str(out))}", note):
        return _pull_locked(src, out, remote, overwrite, progress, note, limits, jobs)


def _claim(out: Path, remote: RemoteManifest, overwrite: bool) -> dict | None:
    """May this pull write into `out`? It may when `out` is empty, or holds this data set (its manifest), or an
    unfinished pull of it (its source.json); anything else needs `overwrite`. Returns the manifest being replaced."""
    manifest_path, source_path = out / MANIFEST, out / SOURCE_FILE
    if manifest_path.exists():
        if hashlib.sha256(manifest_path.read_bytes()).hexdigest() == remote.sha256:
            return None
        what = "another data set (its manifest.json differs)"
    elif source_path.exists():
        try:
            recorded = read_json(source_path, max_bytes=1 << 16).get("manifest_sha256")
        except (OSError, FracgenError, AttributeError):
            recorded = None
        if recorded == remote.sha256:
            return None
        what = f"an unfinished pull of another data set ({SOURCE_FILE})"
    else:
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not
                        (p.name.startswith(".") and p.name.endswith(".tmp")))
        if not others:
            return None
        what = f"files that are not a fracgen data set ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    if not overwrite:
        raise FracgenError(f"{out} holds {what}; pass --overwrite to replace it, or pull into another folder")
    try:
        old = read_json(manifest_path)
    except (OSError, FracgenError):
        old = {}
    manifest_path.unlink(missing_ok=True)  # from here on the folder does not look complete until this pull is
    return old if isinstance(old, dict) else {}


def _pull_locked(src: Source, out: Path, remote: RemoteManifest, overwrite: bool, progress: Progress | None,
                 note: Note | None, limits: Limits, jobs: int = 1) -> PullResult:
    replaced = _claim(out, remote, overwrite)
    shards = remote.manifest["shards"]
    remove_temporaries(out, [e["file"] for e in shards])  # of a pull (or render) that died: we hold the lock
    origin = {"source": redact(src.spec), "url": redact(src.url(MANIFEST)), "revision": src.revision,
              "commit": src.commit,
              "manifest_sha256": remote.sha256, "fracgen_version": __version__, "started": _now(),
              "finished": None}
    _write_json(out / SOURCE_FILE, origin)  # first, so a rerun knows which data set this folder is receiving

    present = {e["file"] for e in shards if (out / e["file"]).is_file()}
    to_check = sum(e["bytes"] for e in shards if e["file"] in present)
    checked, todo = 0, []
    for entry in shards:
        if entry["file"] in present and matches(out / entry["file"], entry):
            checked += entry["bytes"]
            if progress:
                progress("check", checked, to_check)
        else:
            todo.append(entry)
    kept = len(shards) - len(todo)
    total, done = sum(e["bytes"] for e in todo), 0
    ensure_room(out, total, f"the {len(todo)} shard(s) to fetch")  # a source cannot fill the disk

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("fetch", done, total)

    if progress and todo:
        progress("fetch", 0, total)
    index = {e["file"]: n for n, e in enumerate(shards)}
    _fetch_shards(src, out, todo, on_bytes, note, remote.manifest, index, limits, jobs)

    if replaced is not None:  # --overwrite: the replaced data set's shards and published files go too
        keep = {e["file"] for e in shards}
        for entry in replaced.get("shards") or []:
            name = entry.get("file") if isinstance(entry, dict) else None
            if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]+\.tar", name) and name not in keep:
                (out / name).unlink(missing_ok=True)
        if replaced:
            for name in (CARD, SUMS, PREVIEW, TIMM_INFO):
                (out / name).unlink(missing_ok=True)
    atomic_write(out / MANIFEST, lambda f: f.write(remote.data))  # last: now the folder is complete
    write_readers_files(out, remote.manifest)  # derived here from the checked manifest, never fetched
    _write_json(out / SOURCE_FILE, {**origin, "finished": _now()})
    return PullResult(out, remote.manifest, src, [e["file"] for e in todo], total, kept)


class _Stopped(Exception):
    """Another shard of the same pull failed (or Ctrl-C came): this download stops at its next chunk."""


def _fetch_shards(src: Source, out: Path, todo: list[dict], on_bytes, note: Note | None, manifest: dict,
                  index: dict[str, int], limits: Limits, jobs: int) -> None:
    """The shards `todo`, up to `jobs` at a time in threads (the work is waiting on sockets and hashing, both done
    outside the GIL). A shard that fails stops the others at their next chunk; each removes its temporary file and
    the failure is raised once they have. A Ctrl-C or a preemption signal is raised at once: the threads (daemons, so
    they hold no exit up) stop at their next chunk, and none renames a shard once stopped."""
    if jobs == 1 or len(todo) <= 1:
        for entry in todo:
            _fetch_shard(src, out, entry, on_bytes, note, manifest, index[entry["file"]], limits)
        return
    stop, lock, pending, done = threading.Event(), threading.Lock(), queue.SimpleQueue(), queue.SimpleQueue()
    for entry in todo:
        pending.put(entry)

    def counted(n: int) -> None:  # called after every chunk: where a download learns that the pull has stopped
        if stop.is_set():
            raise _Stopped
        with lock:
            on_bytes(n)

    def work() -> None:
        while not stop.is_set():
            try:
                entry = pending.get_nowait()
            except queue.Empty:
                return
            try:
                _fetch_shard(src, out, entry, counted, note, manifest, index[entry["file"]], limits, stop)
                done.put(None)
            except BaseException as e:  # handed to the pull's thread, which raises it
                done.put(e)

    workers = [threading.Thread(target=work, name=f"fracgen-pull-{n}", daemon=True)
               for n in range(min(jobs, len(todo)))]
    for worker in workers:
        worker.start()
    try:
        for _ in todo:
            while True:
                try:
                    error = done.get(timeout=0.5)  # a timeout: a signal's handler runs between two waits
                    break
                except queue.Empty:
                    continue
            if error is not None:
                raise error
    except Exception:
        stop.set()
        for worker in workers:
            worker.join()
        raise
    except BaseException:
        stop.set()
        raise


def _fetch_shard(src: Source, out: Path, entry: dict, on_bytes, note: Note | None, manifest: dict,
                 index: int, limits: Limits, stop: threading.Event | None = None) -> None:
    """One shard, kept only if its size and sha256 are the manifest's and its samples are the ones the manifest says
    (a manifest can list the hash of any bytes); not renamed into place once `stop` is set."""
    def samples(tmp: Path) -> str | None:
        if stop is not None and stop.is_set():  # the last look before the rename
            raise _Stopped
        problem = check_shard_contents(tmp, entry, manifest["num_classes"], manifest["image"]["size"],
                                       index * manifest["settings"]["shard_size"])
        return problem and f"{problem}: its samples contradict the manifest"

    download_file(src, entry["file"], out, entry["sha256"], size=entry["bytes"], check=samples, on_bytes=on_bytes,
                  note=note, limits=limits)


# --- the one downloader ------------------------------------------------------------------------------------------

def download_file(source: Source, name: str, folder: Path, sha256: str, *, size: int | None = None,
                  limit: int | None = None, check: Callable[[Path], str | None] | None = None,
                  on_bytes: Callable[[int], None] = lambda n: None, note: Note | None = None,
                  limits: Limits = Limits(), what: str = "the manifest", sized_by: str | None = None) -> None:
    """Every file fracgen downloads (shards, manifests' companions, weights) comes through here: streamed into a
    hidden temporary file in `folder` while hashed (retries, --min-rate and --deadline as in _download), checked
    (exactly `size` bytes when the record gives a size, never more than `limit`; the recorded sha256; `check`'s
    verdict on the file, None or one line), fsynced, then renamed to `folder/name`. Anything else removes the
    temporary file and ends in one FracgenError line. The caller holds `folder`'s lock and has checked the room.
    `what` names the record of the sha256 (and of the size, unless `sized_by` names another)."""
    sized_by = sized_by or what
    url = source.url(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w+b") as f:
            digest, got = _download(source, name, f, size if size is not None else limit, on_bytes, note, limits,
                                    what=f"{sized_by} records" if size is not None else "fracgen reads")
            if size is not None and got != size:
                raise FracgenError(f"{url}: {got:,} bytes, {sized_by} says {size:,}: truncated or replaced at the "
                                   "source; nothing was kept")
            if digest != sha256:
                raise FracgenError(f"{url} does not match the sha256 in {what} ({digest[:12]}... is not "
                                   f"{sha256[:12]}...): damaged or replaced at the source; nothing was kept")
            f.flush()
            os.fsync(f.fileno())
        problem = check(Path(tmp)) if check else None
        if problem:
            raise FracgenError(f"{url}: {problem}; nothing was kept")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_room(folder: Path, nbytes: int, what: str) -> None:
    """Refuse, before any byte is fetched, a download that would leave less than RESERVE bytes free."""
    free = shutil.disk_usage(folder).free
    if nbytes > free - RESERVE:
        raise FracgenError(f"{what} take {nbytes / 1e9:.2f} GB; {folder} has {free / 1e9:.2f} GB free (and "
                           f"{RESERVE / 1e9:.2f} GB are left free)")


def remove_temporaries(folder: Path, names) -> None:
    """The hidden temporary files download_file leaves when its process is killed (the caller holds the lock, so
    none of them is being written)."""
    for name in names:
        for tmp in folder.glob(f".{glob_escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- publish ---------------------------------------------------------------------------------------------------

SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(n: int) -> str:
    """The hub's size_categories label for n samples."""
    return next((label for limit, label in SIZE_CATEGORIES if n < limit), "n>1B")


def regenerate_command(manifest: dict) -> str:
    """The manifest's `command` when it is one plain line of `fracgen render`; otherwise (a folder rendered through
    the library, or a command that could break out of the card's code block) the same command built from its
    checked settings (a base read from a file is read from this manifest, which records it)."""
    command = manifest.get("command")
    if isinstance(command, str) and command.startswith("fracgen render ") and printable(command) == command \
            and "`" not in command:
        return command
    args = ["fracgen", "render", "--out", "shards/"]
    for key, value in manifest["settings"].items():
        if key == "base":
            args += ["--base", MANIFEST] if value is not None else []
        else:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(args)


def _yaml(value: str) -> str:
    return json.dumps(printable(value))  # a JSON string is a YAML double-quoted scalar


def _md(value: object) -> str:
    """Text from a manifest or the command line as Markdown text: one line, no HTML, no table cells or code."""
    return html.escape(printable(value)).replace("|", "\\|").replace("`", "'")


def _system_text(system: str, s: dict, base: dict, c: int) -> tuple[str, list[str], list[str]]:
    """(a sentence on what the data are, table rows, more lines) for the card, per data system."""
    if system == "1p-frac":
        drawn = base.get("sigma_drawn")
        base_text = (f"sampled with sigma-factor {s['sigma']} (drawn {drawn:.4f}) from seed {s['seed']}"
                     if isinstance(drawn, (int, float)) else "read from a file (recorded in manifest.json)")
        maps = "\n".join(
            f"| {i} | " + " | ".join(f"{m[k]:+.4f}" for k in "abcdef") + f" | {p:.4f} |"
            for i, (m, p) in enumerate(zip(base["ifs"]["maps"], base["ifs"].get("probabilities") or
                                           [math.nan] * len(base["ifs"]["maps"]), strict=False)))
        bases = s.get("bases", 1)
        what = ("the **1p-frac** system of \"Scaling Backwards: Minimal Synthetic Pre-training?\" (Nakamura et "
                f"al., ECCV 2024): {c} perturbed copies (LIEP classes) of "
                + ("one base fractal" if bases == 1 else f"{bases} base fractals")
                + ", learned with the C-way LPCE loss.")
        rows = [f"| system | 1p-frac: base IFS of {len(base['ifs']['maps'])} affine maps, {base_text}"
                + (f" (base 0 of {bases})" if bases > 1 else "") + " |",
                f"| sigma | {s['sigma']} |", f"| delta | {s['delta']} (perturbation `{s['perturb']}`) |"]
        extra = ["Base system (`x' = a x + b y + e`, `y' = c x + d y + f`, chosen with probability p):", "",
                 "| map | a | b | c | d | e | f | p |", "|---|---|---|---|---|---|---|---|", maps, ""]
        return what, rows, extra
    if system == "fractaldb":
        return (f"a **FractalDB**-style set: {c} classes, each its own fractal (found by the {s['search']} search), "
                "with weight variants, patch masks and flips per class.",
                [f"| system | fractaldb, {s['search']} search, sigma {s['sigma']} |"], [])
    if system == "real":
        return (f"one real image ({_md(base.get('image'))}, {s['image_mode']}) in {c} classes, each a random affine "
                f"perturbation of size Delta {s['delta']}.", [f"| system | real, Delta {s['delta']} |"], [])
    return (f"{c} classes of {s.get('noise')} noise, each one fixed image: a shape-free control.",
            [f"| system | noise ({s.get('noise')}) |"], [])


def dataset_card(manifest: dict, *, license: str, pretty_name: str, source: str, shard_bytes: int) -> str:
    """README.md for a published folder: YAML front matter a dataset hub reads, then what the data are, how to make
    them again, a sample grid and how to pull and train from them."""
    s, image, base = manifest["settings"], manifest["image"], manifest["base"]
    source = printable(source).replace("`", "%60")  # no secret of the URL in a public card, no end of its code
    pattern = card_pattern(manifest)  # the shards only; `fracgen verify` holds the card to these configs
    n, c = manifest["num_samples"], manifest["num_classes"]
    system = s.get("system", "1p-frac")
    what, rows, extra = _system_text(system, s, base, c)
    lines = [
        "---",
        f"license: {_yaml(license)}",
        f"pretty_name: {_yaml(pretty_name)}",
        "task_categories:", "- image-classification",
        "size_categories:", f"- {_yaml(size_category(n))}",
        "tags:", "- synthetic", *(["- fractal"] if system in ("1p-frac", "fractaldb") else []), "- webdataset",
        *card_front_matter(manifest),
        "---",
        "",
        f"# {_md(pretty_name)}",
        "",
        f"Synthetic pre-training images rendered by fracgen {manifest.get('fracgen_version')} (renderer "
        f"{manifest.get('renderer', 1)}): {what} Every image is a pure function of the settings below.",
        "",
        "| | |",
        "|---|---|",
        *rows,
        f"| classes | {c}, {s['per_class']} image(s) each: {n} samples |",
        f"| image size | {image['size']} x {image['size']} px, 8-bit grayscale PNG"
        + (f", {s['points']:,} chaos-game points |" if system in ("1p-frac", "fractaldb") else " |"),
        f"| shards | {len(manifest['shards'])} WebDataset tar files `{pattern}`, {shard_bytes / 1e6:.1f} MB |",
        "",
        *extra,
        "![sample grid: the first images, labelled with their classes](preview.png)",
        "",
        "## Files",
        "",
        f"- `{pattern}`: samples `c{{class:06d}}-i{{instance:06d}}` with `.png` (the image), `.cls` (the class, "
        "ASCII) and `.json` (the class's IFS, its perturbation, the render seed).",
        "- `manifest.json`: every setting, the base system, each class's system and each shard's size and sha256.",
        "- `SHA256SUMS`: `sha256sum -c SHA256SUMS` checks the manifest and the shards without fracgen.",
        "",
        "## Make it again",
        "",
        "```bash",
        regenerate_command(manifest),
        "```",
        "",
        f"fracgen with renderer {manifest.get('renderer', 1)} gives the same bytes (compare with SHA256SUMS).",
        "",
        "## Pull and train",
        "",
        "```bash",
        f"fracgen pull {source} shards/          # checks every shard's size and sha256; run again to resume",
        "fracgen verify shards/",
        f"fracgen-train pretrain --shards {source} --out runs/1p-frac   # pulls once into a cache, then trains",
        "```",
        "",
        "Without fracgen: `webdataset.WebDataset(urls).decode(\"pil\")` reads the shards, or Python's `tarfile`.",
        "",
        PUBLISH_MARK,
        "",
    ]
    return "\n".join(lines)


def check_destination(to: str) -> None:
    """A publish destination, checked before any work: hf://datasets/... (huggingface_hub) or s3:// (boto3 and
    credentials)."""
    if to.startswith("s3://"):
        s3.parse(to)
        s3.check_credentials(to)
    else:
        parse_hub(to)
        _hub()


def hub_token():
    """(huggingface_hub, a write token): asked before any work, so a missing one fails first."""
    hub = _hub()
    token = hub.get_token()
    if not token:
        raise FracgenError("uploading needs a Hugging Face token with write access: set HF_TOKEN (or run "
                           "`hf auth login`)")
    return hub, token


def hub_upload(folder: Path, files: list[str], to: str, repo: str, revision: str | None,
               repo_type: str = "dataset", tool: str = "fracgen publish") -> str:
    """Upload `files` of `folder` to the hub repository `to` names (a data set here, a model for train.publish,
    each parsing its own form of hf://); its page."""
    hub, token = hub_token()
    api = hub.HfApi(token=token)
    try:
        api.create_repo(repo, repo_type=repo_type, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type=repo_type, revision=revision,
                          allow_patterns=files, commit_message=f"{tool} ({len(files)} files)")
    except Exception as e:  # the hub's errors are many types; the user gets one line, and never the token
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(token, "***")[:300]
        raise FracgenError(f"upload to {to} failed: {reason}") from None
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    return page + (f"/tree/{revision}" if revision else "")


def publish(folder: str | Path, *, to: str | None = None, url: str | None = None, license: str = "cc-by-4.0",
            pretty_name: str | None = None, progress: Progress | None = None, note: Note | None = None) -> dict:
    """Check a finished folder, write README.md (dataset card), SHA256SUMS and preview.png beside its shards, and
    with `to` (hf://datasets/ORG/NAME[@REVISION] or s3://BUCKET/PREFIX/) upload those and the data. `url`: where the
    folder will be served, for the card's pull commands (default: `to`). Returns {"files": [...], "url": the hub
    page, the s3:// folder or None}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FracgenError(f"{folder} is not a directory")
    if to is not None:
        check_destination(to)  # a bad destination, or no credentials, fails before any work
    with FolderLock(folder, "fracgen publish", note):
        problems = verify_dataset(folder, progress, card=False)  # the card is written again below
        if problems:
            more = f" (and {len(problems) - 1} more; `fracgen verify` lists them)" if len(problems) > 1 else ""
            raise FracgenError(f"{folder} does not verify, so it is not published: {problems[0]}{more}")
        manifest = load_manifest(folder / MANIFEST)
        s = manifest["settings"]
        system = s.get("system", "1p-frac")
        knobs = {"1p-frac": f"sigma {s.get('sigma')}, delta {s.get('delta')}", "fractaldb": f"sigma {s.get('sigma')}",
                 "real": f"delta {s.get('delta')}", "noise": str(s.get("noise"))}.get(system, "")
        pretty_name = pretty_name or (f"{system}: {knobs}, {manifest['num_classes']} classes, "
                                      f"{manifest['image']['size']} px")
        shard_bytes = sum(e["bytes"] for e in manifest["shards"])
        contact_sheet(folder, folder / PREVIEW, count=16, columns=4, tile=192)
        card = dataset_card(manifest, license=license, pretty_name=pretty_name,
                            source=url or to or "https://YOUR-SERVER/PATH/", shard_bytes=shard_bytes)
        atomic_write(folder / CARD, lambda f: f.write(card.encode()))
        write_timm_info(folder, manifest)  # a folder rendered before fracgen wrote it gets it now
        sums = [(file_sha256(folder / MANIFEST)[0], MANIFEST), (file_sha256(folder / TIMM_INFO)[0], TIMM_INFO)] + \
            [(e["sha256"], e["file"]) for e in manifest["shards"]]
        text = "".join(f"{digest}  {name}\n" for digest, name in sums).encode()  # the format `sha256sum -c` reads
        atomic_write(folder / SUMS, lambda f: f.write(text))
        files = [CARD, SUMS, PREVIEW, TIMM_INFO, MANIFEST] + [e["file"] for e in manifest["shards"]]
        if to and to.startswith("s3://"):  # the shards first, the manifest last: a reader never sees it early
            url = s3.upload(folder, [e["file"] for e in manifest["shards"]] + [PREVIEW, CARD, TIMM_INFO, SUMS,
                                                                               MANIFEST], to, note)
        else:
            url = hub_upload(folder, files, to, *parse_hub(to)) if to else None
    return {"files": files, "url": url, "pretty_name": pretty_name}

