"""Greedy k-center coreset selection (PatchCore / ToCoAD eq. 7), exact and fast.

Eq. 7 asks for M ⊂ M_O minimising max_{m∈M_O} min_{n∈M} ‖m − n‖; the greedy 2-approximation
repeatedly adds the point farthest from the current selection. A plain loop touches all N points
every iteration (N·d memory traffic per step). Here every point belongs to its nearest selected
centre, and a new centre c can only steal points from centre j if ‖c − c_j‖ < 2·r_j, where r_j is
the largest distance of a point to c_j (triangle inequality, as in accelerated k-means/k-center).
Whole clusters are skipped, so late iterations touch a few hundred points instead of N. The result
is *identical* to the plain greedy loop on the same (optionally projected) features; memory is
O(N·d), never O(N²).
"""
from __future__ import annotations

import numpy as np


def random_projection(x: np.ndarray, dim: int | None, seed: int = 0) -> np.ndarray:
    """Johnson-Lindenstrauss projection to ``dim`` dims (as the official sampler); identity if d <= dim."""
    n, d = x.shape
    if dim is None or d <= dim:
        return np.ascontiguousarray(x, dtype=np.float32)
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(d, dim)).astype(np.float32)
    return np.ascontiguousarray(x.astype(np.float32, copy=False) @ w)


def greedy_coreset(
    x: np.ndarray,
    n_select: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Indices of ``n_select`` rows of ``x`` chosen by greedy k-center selection (eq. 7).

    The first centre is a seeded random row; ties go to the lowest index, so a seed fixes the result.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("coreset selection needs at least one feature vector")
    n_select = int(max(1, min(n_select, n)))
    z = random_projection(x, projection_dim, seed)
    rng = np.random.default_rng(seed)
    first = int(rng.integers(n))
    return _greedy_pruned(z, n_select, first, progress)


def _greedy_pruned(z: np.ndarray, k: int, first: int, progress: bool) -> np.ndarray:
    n, d = z.shape
    centers = np.empty(k, dtype=np.int64)
    cz = np.empty((k, d), dtype=np.float32)  # selected centre coordinates, contiguous for the cdist
    centers[0] = first
    cz[0] = z[first]
    mind = np.sqrt(((z - z[first]) ** 2).sum(1, dtype=np.float32))  # distance to own centre
    # cluster membership as index arrays; radius[j] = max mind over cluster j
    members: list[np.ndarray] = [np.arange(n)]
    radius = np.empty(k, dtype=np.float32)
    radius[0] = mind.max()
    # argmax point of each cluster, kept so the next centre is found in O(k)
    far = np.empty(k, dtype=np.int64)
    far[0] = int(np.argmax(mind))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=k, desc="coreset", unit="pt", mininterval=1.0)
        bar.update(1)
    for t in range(1, k):
        j_star = int(np.argmax(radius[:t]))
        c = int(far[j_star])
        centers[t] = c
        zc = z[c]
        cz[t] = zc
        # distance from the new centre to every existing centre: O(t·d), small next to N·d
        dc = np.sqrt(((cz[:t] - zc) ** 2).sum(1, dtype=np.float32))
        cand = np.flatnonzero(dc < 2.0 * radius[:t])
        stolen = []
        for j in cand:
            idx = members[j]
            dist = np.sqrt(((z[idx] - zc) ** 2).sum(1, dtype=np.float32))
            moved = dist < mind[idx]
            if not moved.any():
                continue
            keep = idx[~moved]
            mv = idx[moved]
            mind[mv] = dist[moved]
            stolen.append(mv)
            members[j] = keep
            if keep.size:
                mk = mind[keep]
                a = int(np.argmax(mk))
                radius[j] = mk[a]
                far[j] = keep[a]
            else:
                radius[j] = 0.0
                far[j] = c
        new = np.concatenate(stolen) if stolen else np.array([c], dtype=np.int64)
        mind[c] = 0.0
        members.append(new)
        mn = mind[new]
        a = int(np.argmax(mn))
        radius[t] = mn[a]
        far[t] = new[a]
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return centers


def greedy_coreset_reference(x: np.ndarray, n_select: int, first: int = 0) -> np.ndarray:
    """Plain O(N·k·d) greedy loop, for tests and benchmarks only."""
    z = np.asarray(x, dtype=np.float32)
    centers = [first]
    mind = np.sqrt(((z - z[first]) ** 2).sum(1))
    for _ in range(1, n_select):
        c = int(np.argmax(mind))
        centers.append(c)
        mind = np.minimum(mind, np.sqrt(((z - z[c]) ** 2).sum(1)))
    return np.array(centers, dtype=np.int64)


def covering_radius(x: np.ndarray, selected: np.ndarray, batch: int = 8192) -> float:
    """max over x of min over s ∈ selected of ‖x − s‖, in the full feature space (faiss k=1 search)."""
    import faiss

    xs = np.ascontiguousarray(x[selected], dtype=np.float32)
    index = faiss.IndexFlatL2(xs.shape[1])
    index.add(xs)
    worst = 0.0
    for s in range(0, x.shape[0], batch):
        d, _ = index.search(np.ascontiguousarray(x[s : s + batch], dtype=np.float32), 1)
        worst = max(worst, float(np.sqrt(max(d.max(), 0.0))))
    return worst
