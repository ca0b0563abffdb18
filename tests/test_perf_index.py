"""The recommended large-collection index works through index_build's own code."""

from __future__ import annotations

import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_faiss_scale import clustered_vectors, nn_recall_at_k, recall_at_k  # noqa: E402

from index_build.faiss_index import make_faiss_index, set_search_params  # noqa: E402

RECOMMENDED = "factory:IVF1024,RaBitQ4"


def test_recall_helpers_hand_computed():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 2, 9], [7, 8, 4]])
    assert recall_at_k(exact, approx, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert nn_recall_at_k(exact, approx, 3) == 0.5  # query 0 misses its nearest neighbour 1
    assert nn_recall_at_k(exact, approx, 2) == 0.0


def test_clustered_vectors_shape_and_determinism():
    xb = clustered_vectors(500, d=32, clusters=10, rank=4, seed=0)
    assert xb.shape == (500, 32) and xb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(xb, clustered_vectors(500, d=32, clusters=10, rank=4, seed=0))
    # clustered: a vector's nearest other vector is far closer than a random one
    sims = xb[:50] @ xb.T
    np.fill_diagonal(sims[:, :50], -1)
    assert np.median(sims.max(axis=1)) > 0.7 > 0.2 > np.median(np.abs(xb[:50] @ xb[50:100].T))


def test_recommended_index_through_make_faiss_index():
    """The benchmark's chosen type, scaled down (16 lists), built by index_build: high recall vs
    exact search, nprobe restored after a serialisation round trip, label-style selectors work."""
    xb = clustered_vectors(4000, d=64, clusters=40, rank=8, seed=0)
    xq = clustered_vectors(100, d=64, clusters=40, rank=8, seed=1)
    spec = RECOMMENDED.replace("IVF1024", "IVF16")
    index, used = make_faiss_index(xb, spec, {"nprobe": 16})
    assert used == {"train_size": 4000, "nprobe": 16}
    assert faiss.extract_index_ivf(index).nprobe == 16
    flat, _ = make_faiss_index(xb, "flat")
    _, exact = flat.search(xq, 10)
    _, approx = index.search(xq, 10)
    assert recall_at_k(exact, approx, 10) >= 0.9
    reloaded = faiss.deserialize_index(faiss.serialize_index(index))
    set_search_params(reloaded, used)
    np.testing.assert_array_equal(reloaded.search(xq, 10)[1], approx)
    even = faiss.IDSelectorBatch(np.arange(0, len(xb), 2, dtype=np.int64))
    _, filtered = index.search(xq, 5, params=faiss.SearchParametersIVF(sel=even, nprobe=16))
    assert (filtered[filtered >= 0] % 2 == 0).all()
