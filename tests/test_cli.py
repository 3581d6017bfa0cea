import json

import pytest
from typer.testing import CliRunner

from fracgen.cli import app

SMALL = ["--classes", "6", "--size", "64", "--points", "3000", "--shard-size", "4", "--workers", "1"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, match):
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and match in result.output.replace("\n", " "), result.output
    assert "Traceback" not in result.output


def test_render_verify_info_preview(tmp_path):
    out = tmp_path / "ds"
    r = run("render", "--out", out, *SMALL)
    assert r.exit_code == 0, r.output
    assert "wrote 6 samples in 2 shards" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["command"].startswith(f"fracgen render --out {out} --system 1p-frac --sigma 3.5 --delta 0.1 "
                                   "--perturb scale")
    assert "--classes 6" in m["command"] and "--png-level 1" in m["command"]
    r = run("verify", out)
    assert r.exit_code == 0 and "matches its manifest" in r.output
    r = run("info", out)
    assert r.exit_code == 0 and "sigma 3.5" in r.output and "map 1" in r.output
    r = run("preview", out, "--out", tmp_path / "grid.png", "--count", "4", "--columns", "2", "--tile", "64")
    assert r.exit_code == 0 and (tmp_path / "grid.png").stat().st_size > 0
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (128, 128)


def test_verify_names_the_corrupt_shard(tmp_path):
    out = tmp_path / "ds"
    assert run("render", "--out", out, *SMALL).exit_code == 0
    shard = out / "1p-frac-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    one_line_error(run("verify", out), "1p-frac-000001.tar")


def test_second_render_refuses_then_resume_and_overwrite(tmp_path):
    out = tmp_path / "ds"
    assert run("render", "--out", out, *SMALL).exit_code == 0
    one_line_error(run("render", "--out", out, *SMALL), "--overwrite")
    assert run("render", "--out", out, *SMALL, "--resume").exit_code == 0
    assert run("render", "--out", out, *SMALL, "--overwrite").exit_code == 0


def test_resume_of_an_older_renderer_keeps_it_and_says_so(tmp_path):
    out = tmp_path / "ds"
    assert run("render", "--out", out, *SMALL).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["renderer"] = 2  # as an older fracgen wrote it (`make pretrain` on a checkout's old shards)
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = (out / "manifest.json").read_bytes()
    r = run("render", "--out", out, *SMALL, "--resume")
    assert r.exit_code == 0, r.output
    assert "is complete (renderer 2" in r.output
    assert "whose images differ: kept as it is; --overwrite redraws it" in r.output
    assert (out / "manifest.json").read_bytes() == before
    fresh = tmp_path / "fresh"  # this fracgen's own render: no note
    assert run("render", "--out", fresh, *SMALL).exit_code == 0
    r = run("render", "--out", fresh, *SMALL, "--resume")
    assert "is complete" in r.output and "note:" not in r.output


@pytest.mark.parametrize("args,match", [
    (["--sigma", "6.5"], "infeasible"),
    (["--sigma", "0.05"], "infeasible"),
    (["--delta", "-0.1"], "--delta must be >= 0"),
    (["--classes", "0"], "--classes must be at least 1"),
    (["--size", "16"], "too small for padding"),
    (["--size", "20000"], "size must be at most 16384"),
    (["--points", "0"], "points must be in 1..100,000,000"),
    (["--points", "1000000000"], "points must be in 1..100,000,000"),
    (["--perturb", "bogus"], "--perturb must be one of"),
    (["--fill", "1.5"], "--fill must be in"),
    (["--name", "a.b"], "--name must be 1 to 100"),
])
def test_bad_input_is_one_line(tmp_path, args, match):
    one_line_error(run("render", "--out", tmp_path / "ds", *SMALL, *args), match)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_bad_paths_are_one_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_error(run("render", "--out", f, *SMALL), "not a directory")
    one_line_error(run("render", "--out", f / "sub", *SMALL), "cannot create --out")
    bad = tmp_path / "base.json"
    bad.write_text("{oops")
    one_line_error(run("render", "--out", tmp_path / "ds", *SMALL, "--base", bad), "not valid JSON")
    one_line_error(run("render", "--out", tmp_path / "ds", *SMALL, "--base", tmp_path / "nope.json"), "not found")
    one_line_error(run("verify", tmp_path), "no manifest.json")
    one_line_error(run("info", tmp_path / "missing"), "not a directory")


def test_no_bracketed_text_of_a_help_text_is_taken_for_rich_markup():
    """Typer renders help texts as rich markup, where `[dask]` is a style tag and `[@REVISION]` an event handler:
    both vanished (`pip install 'fracgen'`, `hf://ORG/NAME`). Every bracket of both tools' options is escaped, and
    then shows."""
    import importlib
    import re

    import typer.main

    apps = [("fracgen", app)] + [(f"fracgen-train {m.split('.')[0]}", importlib.import_module(f"train.{m}").app)
                                 for m in ("pretrain", "finetune", "probe", "publish", "experiments.__main__")]
    checked = 0
    for tool, typer_app in apps:
        command = typer.main.get_command(typer_app)
        commands = command.commands.items() if hasattr(command, "commands") else [(None, command)]
        for name, sub in commands:
            for param in sub.params:
                text = param.help or ""
                assert not re.search(r"(?<!\\)\[[^\]\s]+\]", text), f"{tool} {name}: markup in {text!r}"
                for escaped in re.findall(r"\\\[([^\]\s]+)\]", text):
                    shown = CliRunner().invoke(typer_app, [*([name] if name else []), "--help"],
                                               env={"COLUMNS": "1000"}).output
                    assert f"[{escaped}]" in shown, (tool, name, escaped)
                    checked += 1
    assert checked >= 6  # the dask extra and the hub revisions


def test_too_few_points_for_the_size_says_so(tmp_path):
    """Fill is the share of the canvas the points ink: at 512 px, 300 points cannot pass --fill, whatever the
    seed; the error names the points and the size, not only the seed and --fill."""
    result = run("render", "--out", tmp_path / "ds", "--classes", "2", "--size", "512", "--points", "300",
                 "--workers", "1")
    one_line_error(result, "or draw more --points than 300 for a --size of 512 px (or a smaller --size)")
    assert not (tmp_path / "ds").exists()
