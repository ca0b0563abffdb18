"""FAISS construction and search parameters: the one place that knows about index types.

Every index is an inner-product index over L2-normalised vectors (cosine similarity). The
index types of ``--index-type`` are ``flat`` (exact), ``ivfpq``, ``hnsw`` and
``factory:<faiss index_factory string>``. Search-time parameters (``nprobe``, ``ef_search``)
are set by inspecting the index object, never by its type name, so that wrapped or factory
indexes get the same treatment as the built-in types.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import faiss
import numpy as np

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "ivfpq", "hnsw")
SEARCH_PARAMS = ("nprobe", "ef_search")

__all__ = [
    "INDEX_TYPES",
    "SEARCH_PARAMS",
    "check_index_type",
    "default_index_params",
    "empty_faiss_index",
    "make_faiss_index",
    "search_knob",
    "search_parameters",
    "set_search_params",
    "training_rows",
]


def check_index_type(index_type: str) -> None:
    """Raise ``ValueError`` unless ``index_type`` is one of :data:`INDEX_TYPES` or ``factory:<string>``."""
    if index_type not in INDEX_TYPES and not (index_type.startswith("factory:") and len(index_type) > 8):
        raise ValueError(f"unknown index type {index_type!r}; choose one of {INDEX_TYPES} or 'factory:<faiss string>'")


def _largest_divisor(d: int, limit: int) -> int:
    return max(m for m in range(1, max(1, limit) + 1) if d % m == 0)


def default_index_params(index_type: str, n: int, d: int) -> dict:
    """Parameters used when none are given, sized for ``n`` vectors of dimension ``d``.

    - ``ivfpq``: ``nlist = clip(4 sqrt(n), 1, n / 39)`` inverted lists (FAISS wants >= 39
      training points per centroid), ``m`` = the largest divisor of ``d`` up to ``min(64, d / 4)``
      sub-quantisers, ``nbits = clip(log2(n / 39), 1, 8)``, ``nprobe = min(nlist, 16)``,
      trained on up to ``train_size = 100,000`` random vectors.
    - ``hnsw``: ``M = 32``, ``ef_construction = 200``, ``ef_search = 128``.
    - ``factory:<string>``: ``train_size``; ``nprobe`` / ``ef_search`` may be given.
    - ``flat``: none.
    """
    check_index_type(index_type)
    if index_type == "flat":
        return {}
    if index_type == "ivfpq":
        train_size = min(n, 100_000)
        nlist = int(max(1, min(4 * math.sqrt(n), train_size // 39)))
        nbits = int(min(8, max(1, math.floor(math.log2(max(2, train_size / 39))))))
        m = _largest_divisor(d, min(64, d // 4))
        return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, 16), "train_size": train_size}
    if index_type == "hnsw":
        return {"M": 32, "ef_construction": 200, "ef_search": 128}
    return {"train_size": min(n, 100_000)}


def _ivf(index: faiss.Index) -> Optional[faiss.IndexIVF]:
    """The inverted-file index inside ``index`` (through any wrapper), or ``None``."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw(index: faiss.Index) -> Optional[faiss.IndexHNSW]:
    """``index`` as an HNSW index, or ``None``."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def search_knob(index: faiss.Index) -> Optional[str]:
    """The search parameter that trades speed for recall on ``index``: ``"nprobe"``, ``"ef_search"`` or ``None``."""
    if _ivf(index) is not None:
        return "nprobe"
    if _hnsw(index) is not None:
        return "ef_search"
    return None


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply the search-time entries of ``params`` (``nprobe``, ``ef_search``) to ``index``.

    The index object decides what applies: ``nprobe`` to an inverted-file index (also inside a
    wrapper or a factory string), ``ef_search`` to an HNSW graph. Entries that do not apply are
    ignored; build-time entries (``nlist``, ``M``, ...) are not search parameters.
    """
    ivf, hnsw = _ivf(index), _hnsw(index)
    if ivf is not None and "nprobe" in params:
        ivf.nprobe = int(params["nprobe"])
    if hnsw is not None and "ef_search" in params:
        hnsw.hnsw.efSearch = int(params["ef_search"])


def search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters for ``index`` that restrict results to ``selector``.

    FAISS checks the parameter class against the index class (an IVF index refuses plain
    ``SearchParameters``), so the class is chosen from the index object, carrying the index's
    current ``nprobe`` / ``efSearch`` (those set by :func:`set_search_params`).
    """
    ivf, hnsw = _ivf(index), _hnsw(index)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(ivf.nprobe))
    if hnsw is not None:
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(hnsw.hnsw.efSearch))
    return faiss.SearchParameters(sel=selector)


def empty_faiss_index(n: int, d: int, index_type: str = "flat", params: Optional[dict] = None):
    """The untrained, empty index :func:`make_faiss_index` builds for ``n`` vectors of dimension ``d``.

    Returns:
        ``(index, params)`` with the parameters actually used.
    """
    used = default_index_params(index_type, n, d)
    unknown = set(params or {}) - set(used) - set(SEARCH_PARAMS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)} for index type {index_type!r}; known: {sorted(used)}")
    used.update(params or {})
    metric = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    elif index_type == "ivfpq":
        if d % int(used["m"]):
            raise ValueError(f"ivfpq: m={used['m']} must divide the dimension {d}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFPQ(quantizer, d, int(used["nlist"]), int(used["m"]), int(used["nbits"]), metric)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(used["M"]), metric)
        index.hnsw.efConstruction = int(used["ef_construction"])
    else:  # factory:...
        index = faiss.index_factory(d, index_type.split(":", 1)[1], metric)
    return index, used


def training_rows(n: int, params: dict, seed: int = 0) -> Optional[np.ndarray]:
    """The sorted rows (of ``n``) an index is trained on, ``None`` for all of them."""
    size = min(n, int(params["train_size"]))
    return None if size == n else np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def make_faiss_index(xb: np.ndarray, index_type: str = "flat", params: Optional[dict] = None, seed: int = 0):
    """Build a FAISS inner-product index over ``xb`` (``N x D`` float32, L2-normalised).

    Args:
        xb: database vectors; id ``i`` is row ``i``.
        index_type: ``"flat"`` (exact ``IndexFlatIP``), ``"ivfpq"`` (``IndexIVFPQ``, trained on a
            random sample), ``"hnsw"`` (``IndexHNSWFlat``) or ``"factory:<string>"`` (any
            ``faiss.index_factory`` string, trained on a sample when it needs training).
        params: overrides of :func:`default_index_params`.
        seed: seed of the training sample (:func:`training_rows`).

    Returns:
        ``(index, params)`` with the parameters actually used.
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if xb.ndim != 2 or xb.shape[0] < 1:
        raise ValueError(f"xb must be a non-empty N x D array, got shape {xb.shape}")
    n, d = xb.shape
    index, used = empty_faiss_index(n, d, index_type, params)
    if not index.is_trained:
        rows = training_rows(n, used, seed)
        sample = xb if rows is None else xb[rows]
        logger.info("training %s index on %d of %d vectors", index_type, len(sample), n)
        index.train(sample)
    index.add(xb)
    set_search_params(index, used)
    return index, used
