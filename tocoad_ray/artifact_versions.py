"""Versions of an artifact folder: immutable version folders and one small pointer to the current one.

Layout (an artifact written by ``tocoad fit`` is version 1 and stays where it is)::

    ARTIFACT/
      meta.json, bank.safetensors, ...   version 1: the fit
      versions/v0002/                    version 2: a complete artifact (meta.json, bank, config,
                                         hard links to the fit's backbone / adapter files)
      versions/v0003/ ...
      current.json                       {"version": 3, "dir": "versions/v0003", "meta_sha256": ...}
      .lock                              held (flock) while a version is written or chosen

Readers call :func:`current_dir`: without ``current.json`` (every folder written before versions
existed) it is the folder itself. A version folder is written under a temporary name, meta.json
last, renamed into ``versions/`` and only then does ``current.json`` move to it (``os.replace``):
a crash at any point leaves the old pointer, hence the old version, in force. Versions are never
changed in place and never deleted; a rollback only moves the pointer.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .artifact import read_meta
from .errors import ArtifactError
from .fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

POINTER = "current.json"
VERSIONS = "versions"
LOCK = ".lock"
_DIR = re.compile(r"^versions/v(\d{4,})$")
LOCK_TIMEOUT_S = 600.0


def version_dir_name(n: int) -> str:
    return f"{VERSIONS}/v{n:04d}"


def _meta_sha(d: Path) -> str:
    return hashlib.sha256((d / "meta.json").read_bytes()).hexdigest()


def read_pointer(artifact: str | Path) -> dict[str, Any] | None:
    """The parsed ``current.json`` (None when absent: version 1 is current); checked, never trusted."""
    p = Path(artifact) / POINTER
    try:
        raw = p.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ArtifactError(f"cannot read {p}: {e}") from e
    try:
        ptr = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p} is corrupted: {e}") from e
    if not isinstance(ptr, dict) or not isinstance(ptr.get("version"), int) or not isinstance(ptr.get("dir"), str):
        raise ArtifactError(f"{p}: expected {{version, dir, meta_sha256}}, got {raw[:200]!r}")
    d = ptr["dir"]
    if not (d == "." and ptr["version"] == 1 or (_DIR.match(d) and int(_DIR.match(d).group(1)) == ptr["version"])):
        raise ArtifactError(f"{p}: version {ptr['version']} cannot live in {d!r}")
    return ptr


def current_dir(artifact: str | Path) -> Path:
    """The folder holding the artifact's current version (``artifact`` itself when unversioned)."""
    artifact = Path(artifact)
    ptr = read_pointer(artifact)
    if ptr is None:
        return artifact
    d = artifact / ptr["dir"] if ptr["dir"] != "." else artifact
    if not (d / "meta.json").is_file():
        raise ArtifactError(f"{artifact}/{POINTER} points at version {ptr['version']}, but {d}/meta.json is missing")
    want = ptr.get("meta_sha256")
    if want and _meta_sha(d) != want:
        raise ArtifactError(f"{d}/meta.json is corrupted: its sha256 differs from the one {POINTER} recorded")
    return d


def current_version(artifact: str | Path) -> int:
    ptr = read_pointer(artifact)
    return 1 if ptr is None else int(ptr["version"])


def version_path(artifact: str | Path, n: int) -> Path:
    artifact = Path(artifact)
    return artifact if n == 1 else artifact / version_dir_name(n)


def existing_versions(artifact: str | Path) -> list[int]:
    """Version numbers with a complete folder (meta.json present), ascending; 1 is the fit."""
    artifact = Path(artifact)
    out = [1] if (artifact / "meta.json").is_file() else []
    vd = artifact / VERSIONS
    if vd.is_dir():
        for d in vd.iterdir():
            m = _DIR.match(f"{VERSIONS}/{d.name}")
            if m and (d / "meta.json").is_file():
                out.append(int(m.group(1)))
    return sorted(out)


def list_versions(artifact: str | Path) -> list[dict[str, Any]]:
    """One row per version: number, created, bank size, threshold, images added, current or not."""
    artifact = Path(artifact)
    if not (artifact / "meta.json").is_file():
        raise ArtifactError(f"{artifact} is not an artifact: meta.json is missing")
    cur = current_version(artifact)
    rows = []
    for n in existing_versions(artifact):
        d = version_path(artifact, n)
        meta = read_meta(d, verify=False)
        fb = meta.get("feedback") or {}
        rows.append({"version": n, "dir": "." if n == 1 else version_dir_name(n), "current": n == cur,
                     "created": meta.get("created"), "parent": fb.get("parent_version"),
                     "bank_size": meta.get("bank_size"), "threshold": meta.get("threshold"),
                     "added": [{"name": a["name"], "sha256": a["sha256"]} for a in fb.get("added", [])],
                     "reselected": fb.get("reselected", False)})
    return rows


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def artifact_lock(artifact: str | Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock on the artifact folder (``flock`` on ``.lock``): one writer at a time, across
    threads and processes; released by the kernel if the holder dies."""
    import fcntl

    if not (Path(artifact) / "meta.json").is_file():
        raise ArtifactError(f"{artifact} is not an artifact folder (no meta.json)")
    p = Path(artifact) / LOCK
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ArtifactError(f"cannot write to the artifact folder {artifact}: {e}") from e
    try:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() - t0 > timeout_s:
                    raise ArtifactError(f"{artifact}: another update has held the lock for over {timeout_s:.0f} s")
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def set_current(artifact: str | Path, n: int) -> None:
    """Point ``current.json`` at version ``n`` (atomic replace). Call with :func:`artifact_lock` held."""
    artifact = Path(artifact)
    d = version_path(artifact, n)
    read_meta(d, verify=True)  # never point at a version that does not verify
    ptr = {"version": n, "dir": "." if n == 1 else version_dir_name(n), "meta_sha256": _meta_sha(d),
           "switched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(artifact / POINTER, json.dumps(ptr, indent=2).encode())
    _fsync_dir(artifact)


def rollback(artifact: str | Path, n: int) -> dict[str, Any]:
    """Make version ``n`` current again (the pointer moves; no version is changed or removed)."""
    artifact = Path(artifact)
    with artifact_lock(artifact):
        have = existing_versions(artifact)
        if n not in have:
            raise ArtifactError(f"{artifact} has no version {n}; versions: {', '.join(map(str, have)) or 'none'}")
        prev = current_version(artifact)
        set_current(artifact, n)
    logger.info("%s: version %d is current again (was %d)", artifact, n, prev)
    return {"version": n, "previous_version": prev}


def write_version(artifact: str | Path, write: Callable[[Path, int], None], link_from: Path,
                  link_files: list[str]) -> int:
    """Write a new version folder and make it current; returns its number. Call with the lock held.

    ``write(tmp, n)`` writes version n's own files into a temporary folder, meta.json last;
    ``link_files`` (large, unchanged files such as the fine-tuned backbone) are hard-linked from
    ``link_from`` first (copied where links are not possible)."""
    artifact = Path(artifact)
    vroot = artifact / VERSIONS
    vroot.mkdir(exist_ok=True)
    for stale in vroot.glob(".tmp-*"):  # left by a crashed update (we hold the lock: nobody writes them)
        shutil.rmtree(stale, ignore_errors=True)
    n = max(existing_versions(artifact) + [1]) + 1
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-v{n:04d}-", dir=vroot))
    try:
        for name in link_files:
            try:
                os.link(link_from / name, tmp / name)
            except OSError:
                shutil.copy2(link_from / name, tmp / name)
        write(tmp, n)
        if not (tmp / "meta.json").is_file():
            raise ArtifactError("internal: the new version has no meta.json")
        _fsync_dir(tmp)
        os.rename(tmp, artifact / version_dir_name(n))
        _fsync_dir(vroot)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_current(artifact, n)
    return n
