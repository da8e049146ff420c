"""The command line's conventions, checked on the real parser and real commands: one default
method, the same data/verbosity flags, help on every argument with defaults, --version, a
torch-free --help, suggestions for mistyped commands/categories/keys, and user errors as one
line with exit code 2 (never a traceback)."""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tocoad_ray import __version__
from tocoad_ray.cli import build_parser, main

from ._subset import mvtec_subset

ROOT = Path(__file__).resolve().parents[1]
RUNNING = ("fit", "evaluate", "predict", "export", "synth", "train-all", "tune", "serve")


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in ap._actions:  # noqa: SLF001
        if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
            return dict(a.choices)
    return {}


def _walk(ap, path=()):
    yield path, ap
    for name, sub in _subparsers(ap).items():
        yield from _walk(sub, (*path, name))


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_every_command_is_there_with_the_same_flags():
    cmds = _subparsers(build_parser())
    assert set(RUNNING) <= set(cmds)
    for name in RUNNING:
        opts = {o for a in cmds[name]._actions for o in a.option_strings}  # noqa: SLF001
        assert {"-q", "--quiet", "-v", "--verbose"} <= opts, name
    for name in ("fit", "evaluate", "synth", "train-all", "tune"):
        data = next(a for a in cmds[name]._actions if "--data" in a.option_strings)  # noqa: SLF001
        assert data.default == "elpv" and not data.required, name  # one name for the packaged data


def test_every_argument_has_help_and_shows_its_default():
    for path, ap in _walk(build_parser()):
        for a in ap._actions:  # noqa: SLF001
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):  # noqa: SLF001
                continue
            assert a.help, f"tocoad {' '.join(path)} {a.dest}: no help text"
        if path:
            text = ap.format_help()
            for a in ap._actions:  # noqa: SLF001
                if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and a.help:
                    assert f"default: {a.default}" in " ".join(text.split()) or "default:" in a.help, \
                        f"tocoad {' '.join(path)} {a.option_strings[0]}: default {a.default!r} not shown"


def test_the_default_method_is_tocoad_everywhere(tmp_path):
    from jobs.train_all import config_from_args
    from jobs.tune import plan_from_args
    from tocoad_ray.commands.args import load

    ap = build_parser()
    assert load(ap.parse_args(["fit", "--category", "mono", "--out", "x"])).method == "tocoad"
    assert config_from_args(ap.parse_args(["train-all"])).method == "tocoad"
    assert plan_from_args(ap.parse_args(["tune"])).base.method == "tocoad"
    assert load(ap.parse_args(["fit", "--category", "mono", "--out", "x", "--method", "patchcore"])).method == "patchcore"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: reconpatch\n")  # a file that names its method keeps it
    assert load(ap.parse_args(["fit", "--category", "mono", "--out", "x", "--config", str(cfg)])).method == "reconpatch"
    assert load(ap.parse_args(["fit", "--category", "mono", "--out", "x"])).data.layout == "elpv"


def test_version_and_a_help_that_imports_no_torch():
    code = ("import sys\nfrom tocoad_ray.cli import main\n"
            "for argv in (['--help'], ['fit', '--help'], ['train-all', '--help'], ['tune', '--help'], ['serve', '--help'],"
            " ['--version']):\n"
            "    assert main(argv) == 0\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'ray', 'faiss', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"tocoad-ray {__version__}" in out.stdout
    assert "HEAVY []" in out.stdout


def test_suggestions_for_mistyped_commands_keys_and_categories(capsys, data_root, tmp_path):
    _one_line_error(capsys, ["trian-all"], "did you mean 'train-all'")
    _one_line_error(capsys, ["fit", "--category", "mono", "--out", str(tmp_path / "a"), "--set", "bank.coreset_raito=0.1"],
                    "coreset_raito", "did you mean 'coreset_ratio'")
    _one_line_error(capsys, ["fit", "--category", "mono", "--out", str(tmp_path / "a"), "--set", "stage3.epochs=1"],
                    "stage3", "did you mean 'stage")
    _one_line_error(capsys, ["fit", "--category", "mono", "--out", str(tmp_path / "a"), "--set", "method=tocod"],
                    "did you mean 'tocoad'")
    # a category is checked (and suggested) before any Ray instance starts
    import ray

    from .ray_fixtures import release_shared_ray

    release_shared_ray()  # an instance another module left running would hide a start here
    ray.shutdown()

    _one_line_error(capsys, ["train-all", "--data", str(data_root / "mvtec_ad"), "--categories", "bottel",
                             "--out", str(tmp_path / "t")], "bottel", "did you mean 'bottle'", "available: bottle")
    _one_line_error(capsys, ["tune", "--data", str(data_root / "mvtec_ad"), "--categories", "botle",
                             "--out", str(tmp_path / "u")], "did you mean 'bottle'")
    assert not ray.is_initialized()
    assert not (tmp_path / "t").exists()


def test_user_errors_are_one_line_with_exit_2(capsys, tmp_path):
    _one_line_error(capsys, ["predict", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")], "exactly one of")
    _one_line_error(capsys, ["serve"], "--artifacts")
    _one_line_error(capsys, ["fit", "--layout", "mvtec", "--category", "a", "--out", str(tmp_path / "a")], "--data ROOT")
    _one_line_error(capsys, ["fit", "--category", "mono", "--out", str(tmp_path / "a"), "--set", "seed=[1"], "YAML")
    assert main(["fit", "--no-such-flag"]) == 2  # argparse's usage error, also exit 2
    assert "required: --category, --out" in capsys.readouterr().err


def test_resume_after_a_config_change_is_a_one_line_error(capsys, data_root, tmp_path):
    root = mvtec_subset(data_root / "mvtec_ad" / "bottle", tmp_path / "data", 4, {"good": 2, "broken_large": 2})
    common = ["fit", "--data", str(root), "--category", "bottle", "--out", str(tmp_path / "art"), "-q",
              "--set", "data.image_size=64", "--set", "data.crop_size=null", "--set", "stage1.epochs=1",
              "--set", "stage1.max_steps_per_epoch=1", "--set", "stage1.batch_size=2", "--set", "stage2.enabled=false",
              "--set", "bank.coreset_ratio=0.5", "--set", "bank.threshold_images=2"]
    assert main(common) == 0
    _one_line_error(capsys, [*common, "--resume", "--set", "stage1.lr=0.5"], "stage1")


def test_the_library_never_imports_the_layers_above_it():
    bad = []
    for path in (ROOT / "tocoad_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("jobs", "serve")]
    assert not bad, bad


@pytest.mark.parametrize("text,dropped", [
    ("\x1b[33m(raylet)\x1b[0m WARNING: 4 PYTHON worker processes have been started on node\n", True),
    ("(raylet) A worker died or was killed while executing a task\n", True),
    ("(autoscaler +3s) Tip: use `ray status`\n", True),
    ("  [    12s] mono: stage1 epoch 1/2 loss 0.41\n", False),
    ("train-all: 2 categories (mono, poly) on Ray (local, 6 CPUs)\n", False),
])
def test_the_console_filter_drops_ray_system_lines_only(text, dropped):
    import io

    from tocoad_ray.distributed.session import RaySystemLineFilter

    sink = io.StringIO()
    f = RaySystemLineFilter(sink)
    for part in (text[:5], text[5:]):  # print() writes in pieces
        f.write(part)
    f.flush()
    assert (sink.getvalue() == "") is dropped and f.dropped == int(dropped)
