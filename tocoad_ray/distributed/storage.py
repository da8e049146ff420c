"""Where a cluster job writes, and a check that every node sees it before any work starts.

A job's output folder (``--out``: artifacts, ``work/``, reports) must be one filesystem that the
driver and every node mount at the same path (NFS, EFS, a PVC); Ray's storage
(``distributed.storage_path``: checkpoints, Tune's experiment) may also be a URI (``s3://``,
``gs://``, ``file://``), handed to Ray untouched. On a multi-node cluster a node-local folder
fails late or, worse, "succeeds" with the output on another node's disk, so ``check_cluster``
writes a marker from the driver, has a task on every alive node read it and write an answer, and
reads the answers back, within seconds, before anything is trained.
"""
from __future__ import annotations

import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from ..errors import StorageError  # noqa: F401 (re-exported)

MARKER_DIR = ".tocoad-storage-check"


def is_uri(path: str | os.PathLike | None) -> bool:
    return path is not None and "://" in str(path)


def resolve(path: str | os.PathLike) -> str:
    """A local path made absolute on the driver (tasks run elsewhere, in other working folders);
    a URI unchanged (never through ``pathlib``: ``s3://b/x`` would become ``s3:/b/x``)."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (query strings such as ``?endpoint_override=``
    stay at the end)."""
    base = str(base)
    if not is_uri(base):
        return str(Path(base, *parts))
    root, _, query = base.partition("?")
    joined = posixpath.join(root.rstrip("/"), *parts)
    return joined + (f"?{query}" if query else "")


def filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) for a URI or a local path."""
    import pyarrow.fs as pafs

    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(path)


def write_text(path: str, text: str) -> None:
    fs, p = filesystem(path)
    fs.create_dir(posixpath.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def read_text(path: str) -> str | None:
    """The file's text, or None where it does not exist (other errors propagate)."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def pafs_selector(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, allow_not_found=True)


def remove(path: str) -> None:
    try:
        fs, p = filesystem(path)
        fs.delete_file(p)
    except Exception:  # noqa: BLE001 - cleanup of a marker is best effort
        pass


@dataclass
class NodeAnswer:
    node: str  # "<node id[:12]> (<ip>)"
    problems: list[tuple[str, str, str]]  # (what, path, reason)


def _node_label(node: dict[str, Any]) -> str:
    return f"{node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"


def working_nodes() -> list[dict[str, Any]]:
    """Alive nodes that can run a job's work (CPUs or GPUs to schedule on)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and
            (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]


NOT_SHARED = ("is not the driver's storage there (the driver's marker is missing): a node-local folder? "
              "give a folder every node mounts at the same path (or a URI for distributed.storage_path)")


def _probe(writable: dict[str, str], readable: dict[str, str], token: str, label: str) -> list[tuple[str, str, str]]:
    """On one node: read each writable path's marker and answer next to it; check each readable path."""
    problems = []
    for what, path in writable.items():
        marker = join(path, MARKER_DIR, token)
        try:
            seen = read_text(marker)
        except Exception as e:  # noqa: BLE001 - reported with the path and node
            problems.append((what, path, f"cannot be read there: {type(e).__name__}: {e}"))
            continue
        if seen != token:
            problems.append((what, path, NOT_SHARED))
            continue
        try:
            write_text(join(path, MARKER_DIR, f"{token}.{label}"), token)
        except Exception as e:  # noqa: BLE001
            problems.append((what, path, f"is not writable there: {type(e).__name__}: {e}"))
    for what, path in readable.items():
        if not os.path.exists(path):
            problems.append((what, path, "does not exist there"))
        elif not os.access(path, os.R_OK):
            problems.append((what, path, "is not readable there"))
    return problems


def describe(bad: list[NodeAnswer], n_nodes: int) -> str:
    """One line per (path, problem), naming the nodes it holds on."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for a in bad:
        for p in a.problems:
            grouped.setdefault(p, []).append(a.node)
    lines = [f"  {what}{' ' + path if path else ''} {reason}; on node{'s' if len(nodes) > 1 else ''} "
             f"{', '.join(nodes)}" for (what, path, reason), nodes in grouped.items()]
    return (f"storage check failed on {len(bad)} of {n_nodes} nodes that can run this job (each must see the "
            f"output folder, storage and inputs at the same path):\n" + "\n".join(lines))


def check_cluster(writable: dict[str, str], readable: dict[str, str] | None = None, timeout_s: float = 30.0,
                  nodes: list[dict[str, Any]] | None = None) -> list[NodeAnswer]:
    """Check, from the driver, that every ``writable`` path (name → local path or URI) is the same
    writable storage on every working node, and every ``readable`` local path exists there.
    Raises ``StorageError`` naming each path and node that fails (or that did not answer within
    ``timeout_s``); returns the answers otherwise. The driver's own node is checked too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    readable = {k: v for k, v in (readable or {}).items() if v}
    token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    written: list[str] = []
    try:
        for what, path in writable.items():  # the driver's side first: a plain local error is clearest
            marker = join(path, MARKER_DIR, token)
            try:
                if not is_uri(path):
                    Path(path).mkdir(parents=True, exist_ok=True)
                write_text(marker, token)
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"{what} {path} is not writable from the driver: {type(e).__name__}: {e}") from e
            written.append(marker)
        nodes = working_nodes() if nodes is None else nodes
        if not nodes:
            raise StorageError("the Ray cluster has no alive node with CPUs or GPUs to run the job")
        probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
        refs = {}
        for n in nodes:
            label = n["NodeID"][:12]
            refs[probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                writable, readable, token, label)] = n
        deadline = time.monotonic() + timeout_s
        answers: list[NodeAnswer] = []
        pending = list(refs)
        while pending and time.monotonic() < deadline:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=max(0.0, deadline - time.monotonic()))
            for ref in done:
                n = refs[ref]
                try:
                    problems = [tuple(p) for p in ray.get(ref)]
                except Exception as e:  # noqa: BLE001 - the node died or the task could not run there
                    problems = [("the storage check", "", f"could not run there: {type(e).__name__}: "
                                                         f"{(str(e).splitlines() or [''])[0]}")]
                answers.append(NodeAnswer(_node_label(n), problems))
        for ref in pending:
            ray.cancel(ref, force=True)
            answers.append(NodeAnswer(_node_label(refs[ref]),
                                      [("the storage check", "", f"did not answer within {timeout_s:.0f} s there")]))
        # the nodes' answers must be visible to the driver: their writes land on the same storage
        for n in nodes:
            label = n["NodeID"][:12]
            a = next(x for x in answers if x.node == _node_label(n))
            if a.problems:
                continue
            for what, path in writable.items():
                reply = join(path, MARKER_DIR, f"{token}.{label}")
                written.append(reply)
                if read_text(reply) != token:
                    a.problems.append((what, path, "is not shared: what was written there is not visible to the "
                                                   "driver (a node-local folder on the driver's side?)"))
        bad = [a for a in answers if a.problems]
        if bad:
            raise StorageError(describe(bad, len(answers)))
        return answers
    finally:
        for m in written:
            remove(m)
        for path in writable.values():  # the marker folder, if nothing else is in it
            try:
                fs, p = filesystem(join(path, MARKER_DIR))
                if not fs.get_file_info(pafs_selector(p)):
                    fs.delete_dir(p)
            except Exception:  # noqa: BLE001
                pass
