"""Retrieval metrics, pure NumPy.

Conventions (shared by every function here):

- ``query_labels``: length-``Nq`` sequence of labels (str or int); ``retrieved_labels``: ``Nq x K``
  array-like of the labels of the ranked results, best first (rank 0 is the top result).
- A result is *relevant* when its label equals the query's label. Missing results (a search
  that returned fewer than ``K`` hits, FAISS id ``-1``) are given as ``None`` and are never
  relevant.
- Only the first ``k`` columns are used; ``K < k`` raises ``ValueError``.
- Every metric is a mean over queries in ``[0, 1]``; with zero queries it raises ``ValueError``
  (a mean over nothing is undefined).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "auroc",
    "average_precision_at_k",
    "kimia_eta",
    "majority_vote_at_k",
    "majority_votes",
    "map_at_k",
    "per_class_mean",
    "recall_at_k",
    "relevance_matrix",
]


def _as_label_array(labels: Any) -> np.ndarray:
    return np.asarray(labels, dtype=object)


def relevance_matrix(query_labels: Sequence[Any], retrieved_labels: Any, k: int) -> np.ndarray:
    """``Nq x k`` boolean matrix: ``rel[i, r]`` is True when result ``r`` of query ``i`` is relevant.

    Raises:
        ValueError: shapes disagree, ``k < 1``, fewer than ``k`` columns, or no queries.
    """
    q = _as_label_array(query_labels)
    r = _as_label_array(retrieved_labels)
    if q.ndim != 1:
        raise ValueError(f"query_labels must be 1-D, got shape {q.shape}")
    if len(q) == 0:
        raise ValueError("no queries: metrics are undefined for an empty query set")
    if r.ndim != 2 or r.shape[0] != len(q):
        raise ValueError(f"retrieved_labels must be Nq x K with Nq={len(q)}, got shape {r.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if r.shape[1] < k:
        raise ValueError(f"k={k} but only {r.shape[1]} results per query were given")
    top = r[:, :k]
    rel = np.zeros(top.shape, dtype=bool)
    for i in range(len(q)):
        for j in range(k):
            label = top[i, j]
            rel[i, j] = label is not None and label == q[i]
    return rel


def recall_at_k(query_labels: Sequence[Any], retrieved_labels: Any, k: int) -> float:
    """Recall@k as used in image retrieval: the fraction of queries with at least one relevant
    result among the top ``k`` (for ``k = 1``: the top result has the query's label)."""
    rel = relevance_matrix(query_labels, retrieved_labels, k)
    return float(rel.any(axis=1).mean())


def average_precision_at_k(
    query_labels: Sequence[Any], retrieved_labels: Any, k: int, num_relevant: Sequence[int] | None = None
) -> np.ndarray:
    """Per-query AP@k: ``sum_r P@(r+1) * rel[r] / denominator`` over ranks ``r < k``.

    The denominator is the number of relevant results within the top ``k`` (the common CBIR
    convention), or ``min(k, num_relevant[i])`` when the number of relevant items in the whole
    gallery is given. A query with no relevant result in its top ``k`` has AP = 0.

    Returns:
        Length-``Nq`` float64 array.
    """
    rel = relevance_matrix(query_labels, retrieved_labels, k).astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, k + 1)
    numerator = (precision * rel).sum(axis=1)
    if num_relevant is None:
        denominator = rel.sum(axis=1)
    else:
        counts = np.asarray(num_relevant, dtype=np.float64)
        if counts.shape != (rel.shape[0],):
            raise ValueError(f"num_relevant must have one count per query ({rel.shape[0]}), got shape {counts.shape}")
        if np.any(counts < rel.sum(axis=1)):
            raise ValueError("num_relevant is smaller than the relevant results already retrieved")
        denominator = np.minimum(counts, k)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def map_at_k(
    query_labels: Sequence[Any], retrieved_labels: Any, k: int, num_relevant: Sequence[int] | None = None
) -> float:
    """mAP@k: the mean over queries of :func:`average_precision_at_k` (same conventions)."""
    return float(average_precision_at_k(query_labels, retrieved_labels, k, num_relevant).mean())


def majority_votes(labels: Sequence[Any]) -> list[tuple[Any, int]]:
    """Vote counts of a ranked label list, most votes first; ties go to the label ranked first.

    ``None`` entries (missing results) do not vote. Example: ``["b", "a", "a", "b", "c"]`` ->
    ``[("b", 2), ("a", 2), ("c", 1)]`` ("b" appears first in the ranking).
    """
    counts: Counter = Counter()
    first: dict[Any, int] = {}
    for rank, label in enumerate(labels):
        if label is None:
            continue
        counts[label] += 1
        first.setdefault(label, rank)
    return sorted(counts.items(), key=lambda item: (-item[1], first[item[0]]))


def majority_vote_at_k(query_labels: Sequence[Any], retrieved_labels: Any, k: int) -> float:
    """mMV@k: the fraction of queries whose majority label among the top ``k`` equals their label.

    Ties between labels with the same number of votes go to the label ranked first; a query
    with no results counts as wrong.
    """
    relevance_matrix(query_labels, retrieved_labels, k)  # validates shapes
    q = _as_label_array(query_labels)
    r = _as_label_array(retrieved_labels)[:, :k]
    correct = 0
    for label, row in zip(q, r):
        votes = majority_votes(list(row))
        correct += bool(votes) and votes[0][0] == label
    return correct / len(q)


def per_class_mean(query_labels: Sequence[Any], values: Sequence[float]) -> dict[Any, float]:
    """Mean of a per-query value (e.g. a 0/1 hit) for each query label, keys sorted."""
    q = _as_label_array(query_labels)
    v = np.asarray(values, dtype=np.float64)
    if v.shape != q.shape:
        raise ValueError(f"values must have one entry per query ({len(q)}), got shape {v.shape}")
    return {label: float(v[q == label].mean()) for label in sorted(set(q.tolist()), key=str)}


def kimia_eta(query_labels: Sequence[Any], top1_labels: Sequence[Any]) -> dict[str, float]:
    """Kimia Path24C scores from the top-1 result of every query.

    With ``R_s`` the queries of class (scan) ``s`` whose top-1 label is ``s`` and ``n_s`` the
    queries of class ``s``: ``eta_p = sum_s |R_s| / sum_s n_s`` (patch-to-scan accuracy, the
    same as Recall@1), ``eta_w = mean_s |R_s| / n_s`` over the classes present among the
    queries (24 scans in Kimia Path24C: whole-scan accuracy), ``eta_total = eta_p * eta_w``.

    Returns:
        ``{"eta_p": ..., "eta_w": ..., "eta_total": ...}``.
    """
    q = _as_label_array(query_labels)
    t = _as_label_array(top1_labels)
    if q.ndim != 1 or t.shape != q.shape:
        raise ValueError(f"query_labels and top1_labels must be 1-D of equal length, got {q.shape} and {t.shape}")
    if len(q) == 0:
        raise ValueError("no queries: metrics are undefined for an empty query set")
    hits = np.array([label is not None and label == top for label, top in zip(q, t)], dtype=np.float64)
    eta_p = float(hits.mean())
    eta_w = float(np.mean(list(per_class_mean(q, hits).values())))
    return {"eta_p": eta_p, "eta_w": eta_w, "eta_total": eta_p * eta_w}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores: P(a positive scores above a negative), ties counting half."""
    positive, negative = np.asarray(positive), np.asarray(negative)
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)
