"""Sharing a folder (issue 11) with real components and no internet: a rendered folder served by the standard
library's threaded HTTP server on a free loopback port, `fracgen publish`, `fracgen pull` and `train.pretrain
--shards URL`. The one fake: for hf:// sources, huggingface_hub's `hf_hub_url` (the function that turns a repo file
into its download URL) points at that server instead of the hub, which cannot be reached from here."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest
from helpers import Server, python, wait_for
from typer.testing import CliRunner

from fracgen import share
from fracgen.cli import app
from fracgen.dataset import Settings, render_dataset
from fracgen.errors import FracgenError
from train.runtime import TrainError

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = Settings(classes=16, size=64, points=3000, shard_size=2)  # 8 shards of 2 samples
TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "2", "--batch", "16", "--log-every", "1",
        "--eval-every", "0"]


def fracgen(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(output: str, exit_code: int, match: str) -> None:
    assert exit_code == 1, output
    lines = [line for line in output.strip().splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), output
    assert match in lines[0], output
    assert "Traceback" not in output


def run(*args, timeout=240) -> subprocess.CompletedProcess:
    return python(*args, timeout=timeout)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def data_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name == "manifest.json" or
            p.suffix == ".tar"}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.glob(".*.tmp")]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("published")
    render_dataset(out, SETTINGS, workers=1)
    share.publish(out, url="http://example.org/1p-frac/")
    return out


@pytest.fixture
def copy(published, tmp_path):
    """A copy of the published folder to damage."""
    def make() -> Path:
        return Path(shutil.copytree(published, tmp_path / "served"))
    return make


# publish

def test_publish_writes_a_card_a_hub_reads_and_sums_sha256sum_checks(published):
    yaml = pytest.importorskip("yaml")  # comes with timm
    text = (published / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    card = yaml.safe_load(front)
    assert card["license"] == "cc-by-4.0" and card["task_categories"] == ["image-classification"]
    assert card["size_categories"] == ["n<1K"] and set(card["tags"]) == {"synthetic", "fractal", "webdataset"}
    assert card["pretty_name"].startswith("1p-frac")
    pattern = card["configs"][0]["data_files"][0]["path"]
    names = [p.name for p in published.iterdir()]
    assert sorted(fnmatch.filter(names, pattern)) == sorted(n for n in names if n.endswith(".tar"))  # no manifest
    for words in ("| sigma | 3.5 |", "| delta | 0.1", "| classes | 16,", "64 x 64 px", "preview.png",
                  share.regenerate_command(json.loads((published / "manifest.json").read_text())),
                  "fracgen pull http://example.org/1p-frac/", "--shards http://example.org/1p-frac/"):
        assert words in body
    assert (published / "preview.png").read_bytes().startswith(b"\x89PNG")
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=published, capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.count(": OK") == 10, check.stdout + check.stderr  # +_info


def test_regenerate_command_from_settings_renders_the_same_bytes(published, tmp_path):
    command = share.regenerate_command(json.loads((published / "manifest.json").read_text()))
    args = command.split()[2:]
    args[args.index("--out") + 1] = str(tmp_path / "again")
    assert fracgen("render", *args, "--workers", "1").exit_code == 0
    assert data_files(tmp_path / "again").keys() == data_files(published).keys()
    assert all((tmp_path / "again" / n).read_bytes() == b for n, b in data_files(published).items()
               if n.endswith(".tar"))


@pytest.mark.parametrize("damage", ["flip", "incomplete"])
def test_publish_refuses_a_damaged_or_unfinished_folder(copy, damage):
    folder = copy()
    (folder / "README.md").unlink()
    if damage == "flip":
        shard = folder / "1p-frac-000003.tar"
        data = bytearray(shard.read_bytes())
        data[5000] ^= 1
        shard.write_bytes(bytes(data))
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        (folder / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    result = fracgen("publish", folder)
    one_line_error(result.output, result.exit_code, "does not verify")
    assert not (folder / "README.md").exists()


def test_publish_uploads_to_a_hub_dataset_without_printing_the_token(copy, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")  # the hub extra; timm brings it too

    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_NotARealTokenButSecret")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create",
                                                                                                        repo_id, kw)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", self.token,
                                                                                                 kw)))
    folder = copy()
    result = fracgen("publish", folder, "--to", "hf://datasets/fracgen-org/one-p-frac")
    assert result.exit_code == 0, result.output
    assert "hf_NotARealTokenButSecret" not in result.output
    assert "https://huggingface.co/datasets/fracgen-org/one-p-frac" in result.output
    (_, repo, create), (_, token, upload) = calls
    assert repo == "fracgen-org/one-p-frac" and create["repo_type"] == "dataset"
    assert token == "hf_NotARealTokenButSecret"
    assert upload["repo_id"] == repo and upload["repo_type"] == "dataset" and upload["folder_path"] == str(folder)
    assert set(upload["allow_patterns"]) == {"README.md", "SHA256SUMS", "preview.png", "manifest.json", "_info.json",
                                             *(f"1p-frac-{i:06d}.tar" for i in range(8))}  # not the lock file

    def refuse(self, **kw):
        raise RuntimeError("401 Client Error: Unauthorized for token hf_NotARealTokenButSecret")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    result = fracgen("publish", folder, "--to", "hf://datasets/fracgen-org/one-p-frac")
    one_line_error(result.output, result.exit_code, "upload to hf://datasets/fracgen-org/one-p-frac failed")
    assert "hf_NotARealTokenButSecret" not in result.output


# pull

def test_pull_over_http_equals_the_source_byte_for_byte_and_verifies(published, tmp_path):
    dest = tmp_path / "pulled"
    with Server(published) as server:
        result = fracgen("pull", server.url, dest)
        assert result.exit_code == 0, result.output
        assert "pulled 8 of 8 shards" in result.output
        assert data_files(dest) == data_files(published)
        assert fracgen("verify", dest).exit_code == 0
        origin = json.loads((dest / "source.json").read_text())
        assert origin["url"] == server.url + "manifest.json" and origin["finished"]
        assert origin["manifest_sha256"] == hashlib.sha256((published / "manifest.json").read_bytes()).hexdigest()
        server.requests.clear()
        again = fracgen("pull", server.url + "manifest.json", dest)  # the manifest's URL works as well
        assert again.exit_code == 0 and "nothing fetched" in again.output, again.output
        assert server.requests == ["/manifest.json"]


@pytest.mark.parametrize("damage", ["flipped byte", "truncated shard", "missing shard", "404"])
def test_a_bad_source_is_one_line_and_leaves_no_half_written_file(copy, tmp_path, damage):
    served = copy()
    shard = served / "1p-frac-000005.tar"
    if damage == "flipped byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x40
        shard.write_bytes(bytes(data))
        match = "1p-frac-000005.tar does not match the sha256 in the manifest"
    elif damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:7000])
        match = "1p-frac-000005.tar: 7,000 bytes, the manifest says"
    elif damage == "missing shard":
        shard.unlink()
        match = "1p-frac-000005.tar: HTTP 404"
    dest = tmp_path / "pulled"
    with Server(served) as server:
        url = server.url + ("no/such/folder/" if damage == "404" else "")
        result = run("-m", "fracgen", "pull", url, dest)
    one_line_error(result.stderr, result.returncode, match if damage != "404" else
                   f"{url}manifest.json: HTTP 404")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    if damage == "404":
        assert not dest.exists()
        return
    assert not (dest / "manifest.json").exists() and not (dest / "1p-frac-000005.tar").exists()
    assert leftovers(dest) == []


@pytest.mark.parametrize(("edit", "match"), [({"complete": False}, "did not finish"),
                                              ({"format_version": 2}, "newer than this fracgen reads")])
def test_an_unfinished_or_newer_manifest_is_refused(copy, tmp_path, edit, match):
    served = copy()
    manifest = json.loads((served / "manifest.json").read_text())
    (served / "manifest.json").write_text(json.dumps({**manifest, **edit}))
    with Server(served) as server:
        result = fracgen("pull", server.url, tmp_path / "pulled")
        assert server.tars() == []
    one_line_error(result.output, result.exit_code, match)
    assert not (tmp_path / "pulled").exists()


def test_transient_http_errors_are_retried(published, tmp_path, monkeypatch):
    monkeypatch.setattr(share, "BACKOFF", 0.01)
    with Server(published, fail_once=("/manifest.json", "/1p-frac-000002.tar")) as server:
        result = fracgen("pull", server.url, tmp_path / "pulled")
    assert result.exit_code == 0, result.output
    assert "HTTP 503" in result.output and "trying again" in result.output
    assert server.tars().count("1p-frac-000002.tar") == 2 and server.requests.count("/manifest.json") == 2
    assert data_files(tmp_path / "pulled") == data_files(published)


def test_a_folder_with_another_data_set_is_refused_unless_overwrite(published, tmp_path):
    dest = tmp_path / "pulled"
    render_dataset(dest, Settings(classes=6, size=64, points=3000, shard_size=1, name="other"), workers=1)
    (dest / "SHA256SUMS").write_text("stale\n")
    with Server(published) as server:
        refused = fracgen("pull", server.url, dest)
        one_line_error(refused.output, refused.exit_code, "holds another data set")
        assert server.tars() == []
        replaced = fracgen("pull", server.url, dest, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert data_files(dest) == data_files(published)
    assert not (dest / "SHA256SUMS").exists() and not list(dest.glob("other-*.tar"))


def test_a_killed_pull_fetches_only_the_missing_shards_when_run_again(published, tmp_path):
    dest = tmp_path / "pulled"
    with Server(published, delay=0.4) as server:
        proc = _popen("-m", "fracgen", "pull", server.url, dest, "--jobs", "2")  # 2 at a time: killed midway
        try:
            assert wait_for(lambda: len(list(dest.glob("*.tar"))) >= 3, 120), proc.communicate(timeout=5)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        present = {p.name for p in dest.glob("*.tar")}
        assert 3 <= len(present) < 8 and not (dest / "manifest.json").exists()
        server.delay = 0
        server.requests.clear()
        result = fracgen("pull", server.url, dest)
    assert result.exit_code == 0, result.output
    assert sorted(server.tars()) == sorted(set(data_files(published)) - present - {"manifest.json"})
    assert data_files(dest) == data_files(published) and leftovers(dest) == []
    assert fracgen("verify", dest).exit_code == 0


def test_two_pulls_into_one_folder_end_with_one_correct_copy(published, tmp_path):
    dest = tmp_path / "pulled"
    with Server(published, delay=0.15) as server:
        procs = [_popen("-m", "fracgen", "pull", server.url, dest) for _ in range(2)]
        results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _, _ in results), results
    for rc, _, stderr in results:
        if rc:  # refused by the lock: one line naming the other pull
            one_line_error(stderr, rc, "is being written by ")
    assert data_files(dest) == data_files(published) and leftovers(dest) == []
    assert sorted(p.name for p in dest.iterdir()) == sorted([*data_files(published), "source.json", ".fracgen.lock",
                                                             "_info.json", "README.md"])  # README: the local card
    assert fracgen("verify", dest).exit_code == 0


def test_pull_from_the_hub_through_huggingface_hub(published, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")  # the hub extra; timm brings it too

    commit = "0123456789abcdef0123456789abcdef01234567"
    asked = []
    monkeypatch.setenv("HF_TOKEN", "hf_NotARealTokenButSecret")
    with Server(published, commit=commit) as server:
        def hf_hub_url(repo_id, filename, *, repo_type=None, revision=None, **kw):  # the hub, on loopback
            asked.append((repo_id, filename, repo_type, revision))
            return f"{server.url}{filename}"

        monkeypatch.setattr(huggingface_hub, "hf_hub_url", hf_hub_url)
        dest = tmp_path / "pulled"
        result = fracgen("pull", "hf://datasets/fracgen-org/one-p-frac@v1", dest)
        assert result.exit_code == 0, result.output
    assert "hf_NotARealTokenButSecret" not in result.output
    assert data_files(dest) == data_files(published)
    assert fracgen("verify", dest).exit_code == 0
    assert {(repo, kind) for repo, _, kind, _ in asked} == {("fracgen-org/one-p-frac", "dataset")}
    assert asked[0][1:] == ("manifest.json", "dataset", "v1")
    assert {rev for _, name, _, rev in asked if name.endswith(".tar")} == {commit}  # the manifest's commit
    assert all(h.get("Authorization") == "Bearer hf_NotARealTokenButSecret" for h in server.headers)
    origin = json.loads((dest / "source.json").read_text())
    assert (origin["source"], origin["revision"], origin["commit"]) == ("hf://datasets/fracgen-org/one-p-frac@v1",
                                                                      "v1", commit)


def test_the_token_does_not_follow_a_redirect_to_another_host(published, tmp_path, monkeypatch):
    """The hub serves large files from a storage host: the token must stay with the hub."""
    huggingface_hub = pytest.importorskip("huggingface_hub")  # the hub extra; timm brings it too

    monkeypatch.setenv("HF_TOKEN", "hf_NotARealTokenButSecret")
    with Server(published) as storage, Server(published) as hub:
        storage_url = storage.url.replace("127.0.0.1", "localhost")  # another host name, the same machine

        class Redirect(SimpleHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                self.send_response(302)
                self.send_header("Location", storage_url + self.path.lstrip("/"))
                self.send_header("X-Repo-Commit", "f" * 40)
                self.end_headers()

            def log_message(self, *args):
                pass

        hub.httpd.RequestHandlerClass = Redirect
        monkeypatch.setattr(huggingface_hub, "hf_hub_url", lambda repo, name, **kw: f"{hub.url}{name}")
        result = fracgen("pull", "hf://datasets/org/name", tmp_path / "pulled")
    assert result.exit_code == 0, result.output
    assert len(hub.requests) == 9 and len(storage.requests) == 9
    assert not any("Authorization" in h for h in storage.headers)
    assert json.loads((tmp_path / "pulled" / "source.json").read_text())["commit"] == "f" * 40


def test_a_pull_fetches_several_shards_at_once_each_checked_as_when_alone(published, copy, tmp_path):
    with Server(published, delay=0.3) as server:
        one = share.pull(server.url, tmp_path / "one", jobs=1)
        assert server.most_in_flight == 1
        server.most_in_flight = 0
        four = share.pull(server.url, tmp_path / "four", jobs=4)
        assert server.most_in_flight > 1  # eight shards, each answered 0.3 s late: they overlap
    assert sorted(one.fetched) == sorted(four.fetched) and len(four.fetched) == 8
    assert data_files(tmp_path / "four") == data_files(published) == data_files(tmp_path / "one")
    assert fracgen("verify", tmp_path / "four").exit_code == 0
    for jobs in (0, share.MAX_JOBS + 1, True):
        with pytest.raises(FracgenError, match=rf"^--jobs must be in 1\.\.{share.MAX_JOBS}, got "):
            share.pull(str(published), tmp_path / "bad", jobs=jobs)
    assert not (tmp_path / "bad").exists()


def test_one_bad_shard_stops_the_others_and_leaves_no_temporary(copy, tmp_path):
    served = copy()
    manifest = json.loads((served / "manifest.json").read_text())
    bad = served / manifest["shards"][-1]["file"]
    bad.write_bytes(bad.read_bytes()[:-1] + b"x")
    dest = tmp_path / "pulled"
    with Server(served, delay=0.2) as server:
        with pytest.raises(FracgenError) as refused:
            share.pull(server.url, dest, jobs=8)
    assert str(refused.value).startswith(f"{server.url}{bad.name} does not match the sha256 in the manifest")
    assert not [p.name for p in dest.iterdir() if p.name.endswith(".tmp")]  # the others stopped and cleaned up
    assert not (dest / "manifest.json").exists() and not (dest / bad.name).exists()
    kept = {p.name for p in dest.glob("*.tar")}
    for entry in manifest["shards"]:  # what stayed is whole: a rerun against a repaired source keeps it
        if entry["file"] in kept:
            assert hashlib.sha256((dest / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


# train from a URL

def test_pretrain_from_a_url_pulls_once_then_finds_the_cache(published, tmp_path):
    cache = tmp_path / "cache"
    with Server(published) as server:
        first = run("-m", "train.pretrain", "--shards", server.url, "--out", tmp_path / "run1", "--steps", "2", *TINY,
                    "--cache-dir", cache)
        assert first.returncode == 0, first.stderr
        assert "shards: pulled 8 shards (" in first.stdout and f"from {server.url} into {cache}" in first.stdout, \
            first.stdout
        assert sorted(server.tars()) == sorted(n for n in data_files(published) if n.endswith(".tar"))
        server.requests.clear()
        second = run("-m", "train.pretrain", "--shards", server.url, "--out", tmp_path / "run2", "--steps", "2",
                     *TINY, "--cache-dir", cache)
        assert second.returncode == 0, second.stderr
        assert "shards: found in cache" in second.stdout and "nothing fetched" in second.stdout, second.stdout
        assert server.requests == ["/manifest.json"]
    key = hashlib.sha256((published / "manifest.json").read_bytes()).hexdigest()
    assert data_files(cache / key) == data_files(published)
    assert (tmp_path / "run2" / "model.pth").is_file()


def test_pretrain_from_a_bad_url_is_one_line(published, tmp_path):
    with Server(published) as server:
        result = run("-m", "train.pretrain", "--shards", server.url + "nothing/", "--out", tmp_path / "run",
                     "--steps", "2", *TINY, "--cache-dir", tmp_path / "cache")
    one_line_error(result.stderr, result.returncode, "nothing/manifest.json: HTTP 404")
    assert not (tmp_path / "run").exists()


def test_a_run_starts_from_its_cached_copy_when_the_source_is_down_and_only_if_every_byte_checks(published,
                                                                                                  tmp_path,
                                                                                                  monkeypatch):
    """A requeued job or a restarted pod whose server is down: the copy a finished pull left in --cache-dir is used
    (its manifest's sha256 is its folder's name, every shard its recorded size and sha256), with a note; a damaged
    copy or another source's is not."""
    from train.source import resolve_shards

    monkeypatch.setattr(share, "BACKOFF", 0.01)  # the refused connections' retries, quickly
    cache, said = tmp_path / "cache", []
    with Server(published) as server:
        url = server.url
        pulled = resolve_shards(url, cache, log=said.append)
    assert said[-1].startswith("shards: pulled 8 shards")
    said.clear()
    assert resolve_shards(url, cache, log=said.append) == pulled  # the server is gone
    assert all("Connection refused; trying again" in line for line in said[:-1]) and len(said) == share.TRIES
    assert said[-1].startswith(f"note: {url} cannot be read now ({url}manifest.json: ")
    assert said[-1].endswith(f"training from its copy in {pulled}, pulled "
                            f"{json.loads((pulled / 'source.json').read_text())['finished']}: its manifest and all 8 "
                            "shards checked by sha256")
    result = run("-m", "train.pretrain", "--shards", url, "--out", tmp_path / "run", "--steps", "2", *TINY,
                 "--cache-dir", cache)
    assert result.returncode == 0 and "training from its copy in" in result.stdout, result.stdout + result.stderr

    with pytest.raises(TrainError, match=rf"^--shards {re.escape(url)}other/: {re.escape(url)}other/manifest"):
        resolve_shards(url + "other/", cache, log=said.append)  # a copy of another source is not this one
    shard = pulled / sorted(data_files(published))[0]
    assert shard.name.endswith(".tar")
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-1] + b"x")
    with pytest.raises(TrainError, match=rf"^--shards {re.escape(url)}: {re.escape(url)}manifest.json: "):
        resolve_shards(url, cache, log=said.append)  # one byte differs: not used
    shard.write_bytes(whole)
    manifest = (pulled / "manifest.json").read_bytes()
    (pulled / "manifest.json").write_bytes(manifest + b" ")  # still valid JSON, but not the manifest pulled
    with pytest.raises(TrainError):
        resolve_shards(url, cache, log=said.append)
    (pulled / "manifest.json").write_bytes(manifest)
    assert resolve_shards(url, cache, log=said.append) == pulled


@pytest.mark.slow  # ~13 s: a 2-rank torchrun; one rank from a URL is in the fast suite
def test_two_ranks_train_from_a_url_with_one_download(published, tmp_path):
    cache = tmp_path / "cache"
    with Server(published) as server:
        cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain",
               "--shards", server.url, "--out", tmp_path / "run", "--steps", "2", *TINY, "--cache-dir", cache]
        result = run(*cmd)
        assert result.returncode == 0, result.stderr
    assert result.stdout.count("shards: pulled 8 shards") == 1
    assert sorted(server.tars()) == sorted(n for n in data_files(published) if n.endswith(".tar"))
    assert "[rank 1] done: 2 steps" in result.stdout


# Issue 20: a source can neither fill the disk nor hang a pull; what it sends is shown safely; URLs keep secrets

class Odd(Server):
    """`Server`, misbehaving on shards as `how` says: trickle (a byte every 50 ms), silent (headers, then
    nothing), busy (503 with Retry-After: 3600), endless (more bytes than the manifest lists, forever), loop (every
    path redirects to itself). It stops misbehaving when the test ends."""

    def __init__(self, root: Path, how: str):
        super().__init__(root)
        self.stop = threading.Event()
        owner, handler = self, self.httpd.RequestHandlerClass

        class Handler(handler.func):
            def do_GET(self):
                owner.requests.append(self.path)
                if how == "loop":
                    self.send_response(302)
                    self.send_header("Location", self.path)
                    self.end_headers()
                    return
                if not self.path.endswith(".tar"):
                    return super().do_GET()
                if how == "busy":
                    self.send_response(503)
                    self.send_header("Retry-After", "3600")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(10**12 if how == "endless" else 30_000))
                self.end_headers()
                try:
                    while not owner.stop.is_set():
                        if how == "trickle":
                            self.wfile.write(b"\0")
                        elif how == "endless":
                            self.wfile.write(bytes(1 << 16))
                            continue
                        owner.stop.wait(0.05)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                    pass

        self.httpd.RequestHandlerClass = partial(Handler, directory=handler.keywords["directory"])

    def __exit__(self, *exc):
        self.stop.set()
        super().__exit__(*exc)


def _pull_in_thread(*args, seconds: float):
    """`fracgen pull` in process, in a thread that must finish within `seconds` (a hung pull fails the test)."""
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fracgen("pull", *args)), daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"pull still running after {seconds} s"
    return box["result"], time.monotonic() - t0


@pytest.mark.parametrize(("how", "options", "match"), [
    ("trickle", ["--min-rate", "1000", "--deadline", "3"], "below the --min-rate of 1,000"),
    ("silent", ["--timeout", "0.5", "--deadline", "2"], "timed out"),
    ("busy", ["--deadline", "2"], "HTTP 503"),
    ("endless", [], "more than the"),
])
def test_a_slow_silent_busy_or_endless_server_ends_in_one_line_naming_the_shard(published, tmp_path, monkeypatch,
                                                                                 how, options, match):
    monkeypatch.setattr(share, "RATE_WINDOW", 0.5)
    with Odd(published, how) as server:
        result, seconds = _pull_in_thread(server.url, tmp_path / "pulled", *options, seconds=12)
    one_line_error(result.output, result.exit_code, match)
    assert re.search(r"1p-frac-00000\d\.tar", result.output) and seconds < 8  # the shard (8 are fetched at once)
    assert leftovers(tmp_path / "pulled") == [] and not (tmp_path / "pulled" / "manifest.json").exists()


def test_a_pull_that_would_fill_the_disk_is_refused_before_it_starts(published, tmp_path, monkeypatch):
    monkeypatch.setattr(share.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**6,
                                                                                           share.RESERVE + 10**4))
    with Server(published) as server:
        result = fracgen("pull", server.url, tmp_path / "pulled")
        assert server.tars() == []
    one_line_error(result.output, result.exit_code, "GB free")


def test_a_redirect_loop_is_one_line(published, tmp_path):
    with Odd(published, "loop") as server:
        result = fracgen("pull", server.url, tmp_path / "pulled")
    one_line_error(result.output, result.exit_code, "redirect loop")


def test_secrets_in_a_url_are_neither_printed_nor_stored(published, tmp_path):
    with Server(published) as server:
        url = server.url.replace("http://", "http://reader:hunter2@") + "manifest.json?X-Signature=s3cr3t"
        result = fracgen("pull", url, tmp_path / "pulled")
        assert result.exit_code == 0, result.output
        assert server.headers[0]["Authorization"] == "Basic cmVhZGVyOmh1bnRlcjI="  # the login still works
        missing = fracgen("pull", url.replace("manifest.json", "gone/"), tmp_path / "other")
        one_line_error(missing.output, missing.exit_code, "HTTP 404")
        trainer = run("-m", "train.pretrain", "--shards", url.replace("manifest.json", "gone/"), "--out",
                      tmp_path / "run", "--cache-dir", tmp_path / "cache", "--steps", "1", *TINY)
        one_line_error(trainer.stderr, trainer.returncode, "HTTP 404")
    stored = (tmp_path / "pulled" / "source.json").read_text() + (tmp_path / "pulled" / ".fracgen.lock").read_text()
    for text in (result.output, missing.output, trainer.stdout + trainer.stderr, stored):
        assert "hunter2" not in text and "s3cr3t" not in text and "reader" not in text
    assert "http://***@127.0.0.1" in json.loads((tmp_path / "pulled" / "source.json").read_text())["source"]


def test_what_a_manifest_says_is_printed_and_published_as_text(copy, tmp_path):
    """Terminal escapes and rich markup in a manifest reach neither the terminal nor the dataset card."""
    served = copy()
    manifest = json.loads((served / "manifest.json").read_text())
    manifest["command"] = "fracgen render\x1b[2J [bold red]x[/]\n```\n<script>alert(1)</script>"
    manifest["fracgen_version"] = "0.1\x1b]0;pwned\x07"
    (served / "manifest.json").write_text(json.dumps(manifest))
    result = fracgen("info", served)
    one_line_error(result.output, result.exit_code, "fracgen_version")
    manifest["fracgen_version"] = "0.1"
    (served / "manifest.json").write_text(json.dumps(manifest))
    (served / "README.md").unlink()
    (served / "SHA256SUMS").unlink()
    shown = fracgen("info", served)
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "[bold red]x[/]" in shown.output and "\\x1b" in shown.output
    assert fracgen("publish", served).exit_code == 0
    card = (served / "README.md").read_text()
    assert "\x1b" not in card and "<script>" not in card and card.count("```") == 4


def test_ctrl_c_during_a_parallel_pull_returns_at_once_and_nothing_is_renamed_after_it(published, tmp_path):
    """The downloads wait on a slow server; Ctrl-C comes: the pull raises at once (the threads hold neither it nor
    the process's exit up), and each thread, when its server answers, stops before a byte is kept."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # xdist's workers ignore SIGINT
    dest = tmp_path / "pulled"
    try:
        with Server(published, delay=2.0) as server:
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                share.pull(server.url, dest, jobs=8)
            assert time.monotonic() - t0 < 1.8  # before the server's first answer
            assert wait_for(lambda: server.tars() and not leftovers(dest), 20)
            time.sleep(2.5)  # every answer has come and been refused by now
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not list(dest.glob("*.tar")) and leftovers(dest) == [] and not (dest / "manifest.json").exists()
