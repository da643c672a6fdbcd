"""Permutational symmetries of a molecule recovered from its training geometries.

Multi-partite matching (sgdml_chapter §7.5.1, eqs. 7.28-7.31): every pair of training geometries
is matched by a bipartite assignment of atoms (of equal element) on the eigenvectors of their
distance (adjacency) matrices; the pairwise matchings are made consistent by keeping only those on
the minimum spanning tree of the matching-cost graph; the kept permutations are closed into a group
(transitive closure).
"""

from __future__ import annotations

import numpy as np
import scipy.optimize
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import minimum_spanning_tree
from scipy.spatial.distance import pdist, squareform
from tqdm.auto import tqdm

#: the closure gives up (and returns the identity) beyond this many permutations, as sgdml does
MAX_PERMS = 100


def _spectral_embedding(R: np.ndarray):
    """Distance matrices (M, N, N) and their eigenvectors, largest eigenvalue first (M, N, N)."""
    adj = np.stack([squareform(pdist(r)) for r in R])
    w, v = np.linalg.eigh(adj)
    order = np.argsort(-w, axis=1)
    v = np.take_along_axis(v, order[:, None, :], axis=2)
    return adj, np.abs(v)


def _pairwise_matching(R: np.ndarray, z: np.ndarray, progress: bool):
    """Bipartite match of every pair (i < j): returns {(i, j): perm} and the cost matrix (M, M)."""
    m, n = R.shape[:2]
    adj, v = _spectral_embedding(R)
    other_element = (z[:, None] != z[None, :]).astype(float)
    cost_mat = np.zeros((m, m))
    perms = {}
    for i in tqdm(range(m), desc="symmetries: bipartite matching", disable=not progress, leave=False):
        for j in range(i + 1, m):
            cost = -v[i] @ v[j].T
            cost += other_element * (np.abs(cost).max() * n + 1.0)   # never match different elements
            _, perm = scipy.optimize.linear_sum_assignment(cost)
            before = np.linalg.norm(adj[i] - adj[j])
            after = np.linalg.norm(adj[i][np.ix_(perm, perm)] - adj[j])
            cost_mat[i, j] = min(before, after)
            if after < before and not np.isclose(after, before):
                perms[i, j] = perm
    return perms, cost_mat


def _close_group(perms: np.ndarray) -> np.ndarray | None:
    """Transitive closure of a set of permutations (S, N); None if it exceeds MAX_PERMS."""
    group = {tuple(p) for p in perms}
    frontier = list(group)
    while frontier:
        new = []
        for p in frontier:
            pa = np.asarray(p)
            for q in list(group):
                for r in (tuple(pa[np.asarray(q)]), tuple(np.asarray(q)[pa])):
                    if r not in group:
                        group.add(r)
                        new.append(r)
                        if len(group) > MAX_PERMS:
                            return None
        frontier = new
    return np.array(sorted(group), dtype=np.int32)


def find_permutations(R: np.ndarray, z: np.ndarray, progress: bool = True) -> np.ndarray:
    """Permutational symmetries of a molecule from its geometries.

    Args:
        R: (M, N, 3) positions, Å (M >= 2; the training geometries).
        z: (N,) atomic numbers; only atoms of equal element are permuted.
        progress: show a progress bar.
    Returns:
        perms: (S, N) int32, a group of permutations with the identity first; a permutation p acts
        on positions as R[p] (atom a of the permuted molecule is atom p[a]).
    """
    R = np.asarray(R, dtype=float)
    z = np.asarray(z)
    n = R.shape[1]
    identity = np.arange(n, dtype=np.int32)[None]
    if R.shape[0] < 2:
        return identity
    pair_perms, cost = _pairwise_matching(R, z, progress)
    cost = cost + cost.T
    np.fill_diagonal(cost, 0.0)
    # zero costs are "no edge" for scipy's sparse graphs; keep identical geometries connected
    cost[(cost == 0) & ~np.eye(len(cost), dtype=bool)] = 1e-300
    tree = minimum_spanning_tree(csr_matrix(cost))
    kept = [identity[0]]
    for a, b in zip(*tree.nonzero()):
        p = pair_perms.get((min(a, b), max(a, b)))
        if p is not None:
            kept.append(p)
    group = _close_group(np.unique(np.array(kept), axis=0))
    if group is None:
        return identity
    ident = np.all(group == identity, axis=1)
    return np.concatenate([identity, group[~ident]]).astype(np.int32)
