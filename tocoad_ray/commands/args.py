"""Argument helpers every ``tocoad`` command shares, so the same flag means the same thing
everywhere: ``--data`` (default: the packaged elpv solar cells), ``--method`` (default: tocoad),
``--config``/``--set``, ``-q``/``-v``. Light on purpose: ``tocoad --help`` imports only this.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..names import DEFAULT_METHOD, LAYOUTS, METHODS, PACKAGED_DATA, did_you_mean


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every argument's default (skipping ``None`` and flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "%(default)" in h or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def add_command(sub, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print warnings, errors and the results only")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="also print debug messages and Ray's own worker logs and notices")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=PACKAGED_DATA, metavar="ROOT",
                   help=f"data root holding one folder per category; '{PACKAGED_DATA}' = the solar-cell images "
                        f"packaged on PyPI (elpv-dataset, categories mono and poly)")
    p.add_argument("--layout", choices=LAYOUTS,
                   help=f"data set layout (default: the config's, mvtec; elpv for --data {PACKAGED_DATA})")


def add_config(p: argparse.ArgumentParser, method: bool = True, config: bool = True) -> None:
    if config:
        p.add_argument("--config", metavar="YAML", help="config file; keys it leaves out keep their documented defaults")
    if method:
        p.add_argument("--method", choices=METHODS,
                       help=f"tocoad (fine-tunes F: the project's method), patchcore (frozen F, no training) or "
                            f"reconpatch; default: the config file's method, else {DEFAULT_METHOD}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value (YAML syntax), e.g. --set bank.coreset_ratio=0.05; repeatable")


def overrides(pairs: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """``["bank.coreset_ratio=0.01"]`` → ``{"bank.coreset_ratio": 0.01}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"{flag} {p!r}: the value is not valid YAML ({e.__class__.__name__})") from e
    return out


def packaged(data: str | None) -> bool:
    """True when ``--data`` names the packaged elpv images."""
    return data in (None, "", PACKAGED_DATA, "-")


def data_root(args: argparse.Namespace) -> str | None:
    """The data root to read, or None for the packaged elpv images."""
    return None if packaged(args.data) else args.data


def layout_override(args: argparse.Namespace) -> dict[str, Any]:
    """``data.layout`` from ``--layout``, or elpv for the packaged data."""
    layout = getattr(args, "layout", None)
    if packaged(getattr(args, "data", None)):
        if layout not in (None, "elpv"):
            raise ConfigError(f"--layout {layout} needs --data ROOT (without --data the packaged elpv images are used)")
        return {"data.layout": "elpv"}
    return {"data.layout": layout} if layout else {}


def file_sets_method(path: str | None) -> bool:
    if not path or not Path(path).is_file():
        return False
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return False  # load_config reports it
    return isinstance(data, dict) and "method" in data


def config_overrides(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Overrides in precedence order: ``base`` < layout < ``--set`` < ``--method``."""
    ov: dict[str, Any] = dict(base or {})
    ov.update(layout_override(args))
    ov.update(overrides(getattr(args, "set", None)))
    if getattr(args, "method", None):
        ov["method"] = args.method
    return ov


def load(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """The Config for a command: ``--config`` file (or defaults) with the command-line overrides."""
    from ..config import load_config

    return load_config(getattr(args, "config", None), config_overrides(args, base))


def categories(value: str | None, available=None) -> list[str] | None:
    """``a,b`` → ["a", "b"]; None or "all" → None (every category); repeats are an error."""
    if value in (None, "all"):
        return None
    cats = [c.strip() for c in value.split(",") if c.strip()]
    if not cats:
        raise ConfigError(f"--categories {value!r} names no category")
    dup = sorted({c for c in cats if cats.count(c) > 1})
    if dup:
        raise ConfigError(f"--categories lists {', '.join(dup)} twice")
    if available is not None:
        for c in cats:
            if c not in available:
                raise DataError(f"category {c!r} not found{did_you_mean(c, available)}; available: {', '.join(available)}")
    return cats
