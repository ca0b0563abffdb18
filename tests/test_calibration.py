"""The close-match threshold: calibrated on the gallery, recorded in the manifest, reported per search."""

from __future__ import annotations

import numpy as np
import pytest

from index_build.calibration import close_match_threshold


def unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_threshold_is_the_percentile_of_kth_neighbour_similarities():
    # four points on a circle at 0, 10, 20, 90 degrees: cosine similarities are exact
    angles = np.deg2rad([0.0, 10.0, 20.0, 90.0])
    x = unit(np.stack([np.cos(angles), np.sin(angles)], axis=1))
    got = close_match_threshold(x, k=1, percentile=0.0)
    # nearest other point: 10, 10, 10 and 70 degrees away -> minimum cos(70 deg)
    assert got["threshold"] == pytest.approx(np.cos(np.deg2rad(70.0)), abs=1e-6)
    assert got["k"] == 1 and got["sample"] == 4
    assert got["median"] == pytest.approx(np.cos(np.deg2rad(10.0)), abs=1e-6)
    # second neighbour: 20, 10, 20 and 80 degrees; 100th percentile = the largest = cos(10 deg)
    assert close_match_threshold(x, k=2, percentile=100.0)["threshold"] == pytest.approx(np.cos(np.deg2rad(10.0)))


def test_near_duplicates_do_not_raise_the_threshold_when_k_exceeds_the_group():
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(20, 16)))
    copies = unit(np.repeat(centres, 5, axis=0) + rng.normal(scale=0.01, size=(100, 16)))
    nearest = close_match_threshold(copies, k=1, percentile=1.0)["threshold"]
    beyond = close_match_threshold(copies, k=10, percentile=1.0)["threshold"]
    assert nearest > 0.99 and beyond < 0.9  # the 10th neighbour lies outside the group of 5


def test_k_is_capped_and_tiny_galleries_have_no_threshold():
    x = unit(np.eye(3))
    assert close_match_threshold(x)["k"] == 2
    assert close_match_threshold(x[:1]) is None


def test_samples_large_galleries_with_a_seed():
    x = unit(np.random.default_rng(1).normal(size=(300, 8)))
    a = close_match_threshold(x, max_sample=100, seed=3)
    assert a == close_match_threshold(x, max_sample=100, seed=3) and a["sample"] == 100


def test_index_records_the_threshold_and_search_reports_close_match(tmp_path, tiny_embedder):
    import pyarrow as pa

    from index_build.patch_index import PatchIndex, write_index
    from index_build.storage import metadata_table

    rng = np.random.default_rng(2)
    centre = np.zeros(tiny_embedder.dim)
    centre[0] = 3.0
    xb = unit(centre + rng.normal(size=(30, tiny_embedder.dim)))  # one cluster: the opposite direction is far
    meta = metadata_table(np.arange(30), ["a"] * 15 + ["b"] * 15, [f"s{i}" for i in range(30)], [b""] * 30)
    assert isinstance(meta, pa.Table)
    written = write_index(tmp_path / "idx", xb, meta, tiny_embedder)
    expected = close_match_threshold(xb)["threshold"]
    index = PatchIndex.load(tmp_path / "idx", tiny_embedder)
    assert index.manifest["close_match"]["threshold"] == expected == written.close_match_threshold
    inside, outside = index.search(embeddings=np.stack([xb[0], -xb[0]]), k=3)
    assert inside.close_match is True and inside.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert outside.close_match is False and outside.threshold == expected
