"""Retrieval metrics on small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from index_build.metrics import (
    auroc,
    average_precision_at_k,
    kimia_eta,
    majority_vote_at_k,
    majority_votes,
    map_at_k,
    per_class_mean,
    recall_at_k,
    relevance_matrix,
)

# Three queries, five ranked results each.
QUERIES = ["a", "b", "a"]
RETRIEVED = [
    ["a", "b", "a", "c", "c"],  # relevant at ranks 0, 2
    ["a", "a", "b", "b", "a"],  # relevant at ranks 2, 3
    ["b", "c", "c", "b", "b"],  # no relevant result
]


def test_relevance_matrix():
    rel = relevance_matrix(QUERIES, RETRIEVED, 3)
    assert rel.tolist() == [[True, False, True], [False, False, True], [False, False, False]]


@pytest.mark.parametrize("k, expected", [(1, 1 / 3), (2, 1 / 3), (3, 2 / 3), (5, 2 / 3)])
def test_recall_at_k(k, expected):
    assert recall_at_k(QUERIES, RETRIEVED, k) == pytest.approx(expected)


def test_average_precision_hand_computed():
    # q0: P@1 = 1, P@3 = 2/3 -> (1 + 2/3) / 2 = 5/6
    # q1: P@3 = 1/3, P@4 = 2/4 -> (1/3 + 1/2) / 2 = 5/12
    # q2: nothing relevant -> 0
    ap = average_precision_at_k(QUERIES, RETRIEVED, 5)
    assert ap.tolist() == pytest.approx([5 / 6, 5 / 12, 0.0])
    assert map_at_k(QUERIES, RETRIEVED, 5) == pytest.approx((5 / 6 + 5 / 12) / 3)


def test_average_precision_with_gallery_counts():
    # q0 has 4 relevant items in the gallery: denominator min(5, 4) = 4 -> (1 + 2/3) / 4 = 5/12
    # q1 has 2: denominator 2 -> 5/12; q2 has 3: 0
    ap = average_precision_at_k(QUERIES, RETRIEVED, 5, num_relevant=[4, 2, 3])
    assert ap.tolist() == pytest.approx([5 / 12, 5 / 12, 0.0])
    with pytest.raises(ValueError, match="smaller than"):
        average_precision_at_k(QUERIES, RETRIEVED, 5, num_relevant=[1, 2, 3])


def test_map_at_k_truncates():
    # k=2: q0 relevant at rank 0 only -> AP 1; q1, q2 -> 0
    assert map_at_k(QUERIES, RETRIEVED, 2) == pytest.approx(1 / 3)


def test_majority_votes_tie_goes_to_first_ranked():
    assert majority_votes(["b", "a", "a", "b", "c"]) == [("b", 2), ("a", 2), ("c", 1)]
    assert majority_votes(["a", None, "c", "c"]) == [("c", 2), ("a", 1)]
    assert majority_votes([None, None]) == []


def test_majority_vote_at_k():
    # k=5: q0 votes a:2 b:1 c:2 -> tie a/c, a ranked first -> "a" correct
    #      q1 votes a:3 b:2 -> "a" wrong; q2 votes b:3 -> wrong
    assert majority_vote_at_k(QUERIES, RETRIEVED, 5) == pytest.approx(1 / 3)
    # k=3: q0 a:2 -> right; q1 a:2 -> wrong; q2 c:2 -> wrong
    assert majority_vote_at_k(QUERIES, RETRIEVED, 3) == pytest.approx(1 / 3)
    # k=1 equals recall@1
    assert majority_vote_at_k(QUERIES, RETRIEVED, 1) == recall_at_k(QUERIES, RETRIEVED, 1)


def test_missing_results_are_never_relevant():
    retrieved = [["a", None], [None, None]]
    assert recall_at_k(["a", "a"], retrieved, 2) == 0.5
    assert majority_vote_at_k(["a", "a"], retrieved, 2) == 0.5
    assert map_at_k(["a", "a"], retrieved, 2) == 0.5


def test_integer_labels_and_numpy_input():
    q = np.array([0, 1, 1])
    r = np.array([[0, 1], [0, 0], [1, 0]])
    assert recall_at_k(q, r, 1) == pytest.approx(2 / 3)
    assert recall_at_k(q, r, 2) == pytest.approx(2 / 3)


def test_kimia_eta_hand_computed():
    # scan s0: 3 queries, 2 right; s1: 1 query, 1 right; s2: 2 queries, 0 right
    queries = ["s0", "s0", "s0", "s1", "s2", "s2"]
    top1 = ["s0", "s1", "s0", "s1", "s0", "s1"]
    eta = kimia_eta(queries, top1)
    assert eta["eta_p"] == pytest.approx(3 / 6)
    assert eta["eta_w"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert eta["eta_total"] == pytest.approx(0.5 * 5 / 9)


def test_per_class_mean():
    assert per_class_mean(["b", "a", "b"], [1, 0, 0]) == {"a": 0.0, "b": 0.5}


@pytest.mark.parametrize(
    "queries, retrieved, k, message",
    [
        ([], np.zeros((0, 3)), 1, "no queries"),
        (["a"], [["a", "b"]], 3, "only 2 results"),
        (["a", "b"], [["a", "b"]], 1, "Nq x K"),
        (["a"], [["a"]], 0, "k must be"),
    ],
)
def test_bad_input(queries, retrieved, k, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(queries, retrieved, k)


def test_kimia_eta_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        kimia_eta(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no queries"):
        kimia_eta([], [])


def test_auroc_counts_ties_half():
    # pairs (positive, negative): 0.9>0.1, 0.9>0.8, 0.8>0.1, 0.8=0.8 -> (3 + 0.5) / 4
    assert auroc([0.9, 0.8], [0.1, 0.8]) == 0.875
    assert auroc([0.1], [0.9]) == 0.0
