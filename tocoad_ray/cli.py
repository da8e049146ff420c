"""``tocoad``: the command line. The library's commands (fit, evaluate, predict, export, synth,
bank) need no cluster; ``train-all``, ``tune`` and ``serve`` come from the ``jobs`` and ``serve``
packages through the ``tocoad.commands`` entry points. Every user error is one line on stderr and
exit code 2; ``--help`` imports no torch."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from importlib.metadata import entry_points

from . import __version__
from .commands import BUILTIN, ENTRY_POINT_GROUP
from .errors import TocoadError
from .names import did_you_mean

DESCRIPTION = """tocoad-ray: industrial visual anomaly detection (ToCoAD, ReConPatch, PatchCore) on Ray.

The main job is `tocoad train-all` (every category of a data root, on a local Ray or a cluster);
its default data are the elpv solar cells packaged on PyPI. ToCoAD is every command's default
method; --method patchcore builds the frozen-F baseline."""


def _plugins():
    try:
        return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
    except Exception:  # noqa: BLE001 - a broken plugin must not take the library's commands down
        return []


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tocoad", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"tocoad-ray {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in BUILTIN:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    for ep in _plugins():
        ep.load()(sub)
    return ap


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """The console format: our progress lines as plain text on stderr; warnings and errors
    prefixed; ``-q`` keeps warnings only, ``-v`` adds debug messages."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO

    class Plain(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            msg = super().format(record)
            return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Plain("%(message)s"))
    for name in ("tocoad_ray", "jobs", "serve"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level)
        lg.propagate = False


def _command_names(ap: argparse.ArgumentParser) -> list[str]:
    for a in ap._actions:  # noqa: SLF001 - argparse keeps subparsers here
        if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
            return list(a.choices)
    return []


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    names = _command_names(ap)
    if argv and not argv[0].startswith("-") and argv[0] not in names:
        print(f"tocoad: error: unknown command {argv[0]!r}{did_you_mean(argv[0], names)}; "
              f"commands: {', '.join(names)}", file=sys.stderr)
        return 2
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version exit 0, usage errors exit 2
        return int(e.code or 0)
    configure_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    try:
        return args.func(args)
    except (TocoadError, ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"tocoad {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tocoad {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
