"""The verdict: fitted on the gallery at build time, one decision per search (index_build.verdict)."""

from __future__ import annotations

import numpy as np
import pytest

from index_build.verdict import (
    DEFAULT_RULE,
    LabelEvidence,
    decide,
    estimate,
    evidence,
    fit_decision,
    near_duplicate_groups,
    rule_of,
)

# A rule that is sure (estimate >= 0.97) only at 8 of 8 votes: z = 20 * share - 16.5 -> 0.971 at 1.0, 0.75 at 7/8.
SURE_AT_8 = {"k": 8, "weights": [20.0, 0.0, 0.0], "intercept": -16.5, "min_precision": 0.97, "fitted": True}
LABELS = ["a", "b", "c"]


def hits(*pairs):
    return [(label, score) for label, n, score in pairs for _ in range(n)]


def unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_evidence_features_are_share_margin_and_top1_over_the_threshold():
    label, f = evidence([("a", 0.95), ("b", 0.93), ("a", 0.92), ("a", 0.90)], threshold=0.9)
    assert label == "a" and f == pytest.approx([0.75, 0.02, 0.05])
    assert evidence([("a", 0.95)] * 8, 0.9) == ("a", pytest.approx([1.0, 0.1, 0.05]))  # no other label: margin 0.1
    assert evidence([("b", 0.5)] * 3, 0.9)[1] == pytest.approx([1.0, 0.1, -0.1])  # clipped
    assert estimate([1.0, 0, 0], SURE_AT_8) == pytest.approx(1 / (1 + np.exp(-3.5)))


def test_one_tile_gives_suggestion_close_call_or_no_close_match():
    sure = decide([hits(("a", 8, 0.95))], 0.9, SURE_AT_8, LABELS)
    assert (sure.kind, sure.label, sure.unit) == ("suggestion", "a", "results")
    assert sure.precision == pytest.approx(1 / (1 + np.exp(-3.5)), abs=1e-6)
    assert sure.labels == (LabelEvidence("a", 8, 8, 0.95),)
    assert "Right about 97% of the time in this gallery at this level of agreement (8 of 8 results)" in sure.text()
    assert "This gallery holds 3 labels (a, b, c) only" in sure.text()

    split = decide([hits(("b", 1, 0.96), ("a", 5, 0.94), ("b", 2, 0.93))], 0.9, SURE_AT_8, LABELS)
    assert (split.kind, split.label, split.precision) == ("close_call", None, None)
    assert split.labels == (LabelEvidence("a", 5, 8, 0.94), LabelEvidence("b", 3, 8, 0.96))
    assert split.headline() == "Close call: a or b"

    far = decide([hits(("a", 8, 0.85))], 0.9, SURE_AT_8, LABELS)
    assert (far.kind, far.close_tiles, far.best_score) == ("no_close_match", 0, 0.85)
    assert "Votes" not in far.text() and "Suggestion" not in far.text()
    assert "0.850, is below this gallery's close-match threshold 0.900" in far.text()


def test_tiles_below_the_threshold_abstain_and_a_majority_of_them_means_no_close_match():
    tiles = [hits(("a", 8, 0.95))] + [hits(("a", 8, 0.80))] * 3
    verdict = decide(tiles, 0.9, SURE_AT_8, LABELS, skipped=2)
    assert (verdict.kind, verdict.tiles, verdict.close_tiles, verdict.skipped) == ("no_close_match", 4, 1, 2)
    assert verdict.close_share == 0.25
    assert "1 of 4 tissue tiles (25%) have a close match; 2 blank tiles skipped." in verdict.text()
    # half abstaining is not most: the two close tiles decide
    half = decide([hits(("a", 8, 0.95))] * 2 + [hits(("b", 8, 0.80))] * 2, 0.9, SURE_AT_8, LABELS)
    assert (half.kind, half.label, half.close_tiles, half.unit) == ("suggestion", "a", 2, "tiles")
    assert half.labels == (LabelEvidence("a", 2, 2, 0.95),)


def test_tiles_that_surely_name_two_labels_are_mixed():
    tiles = [hits(("a", 8, 0.95))] * 2 + [hits(("b", 8, 0.96))] * 2
    verdict = decide(tiles, 0.9, SURE_AT_8, LABELS)
    assert verdict.kind == "mixed" and verdict.label is None
    assert verdict.labels == (LabelEvidence("b", 2, 4, 0.96), LabelEvidence("a", 2, 4, 0.95))
    assert verdict.headline() == "Mixed: b (2 of 4 tiles), a (2 of 4 tiles)"
    # one unsure tile of another label does not split a query of sure tiles
    unsure = hits(("b", 5, 0.94), ("a", 3, 0.93))
    same = decide([hits(("a", 8, 0.95))] * 3 + [unsure], 0.9, SURE_AT_8, LABELS)
    assert (same.kind, same.label, same.labels) == ("suggestion", "a", (LabelEvidence("a", 3, 4, 0.95),))
    # sure tiles that are fewer than half of the voting tiles: a close call naming the tile votes
    weak = decide([hits(("a", 8, 0.95))] + [unsure] * 2, 0.9, SURE_AT_8, LABELS)
    assert weak.kind == "close_call" and weak.labels == (LabelEvidence("b", 2, 3, 0.94), LabelEvidence("a", 1, 3, 0.95))


def test_fit_leaves_out_the_group_and_estimates_precision_from_it():
    rng = np.random.default_rng(0)
    # label a and b: 10 groups of 5 near-copies each, well apart; label c overlaps b (a confusable pair)
    centres = {"a": np.eye(16)[0] * 4, "b": np.eye(16)[1] * 4, "c": np.eye(16)[1] * 4 + np.eye(16)[2] * 0.6}
    rows, labels, groups = [], [], []
    for label, centre in centres.items():
        for g in range(10):
            field = centre + rng.normal(size=16)
            for _ in range(5):
                rows.append(field + rng.normal(scale=0.05, size=16))
                labels.append(label)
                groups.append(f"{label}-{g}")
    x = unit(rows)
    rule = fit_decision(x, labels, groups, threshold=0.5, groups_from="test")
    assert rule["fitted"] is True and rule["sample"] == 150 and rule["groups"] == "test" and rule["k"] == 8
    assert estimate(evidence([("a", 0.9)] * 8, 0.5)[1], rule) > estimate(
        evidence(hits(("b", 4, 0.9), ("c", 4, 0.89)), 0.5)[1], rule
    )
    # without the groups every patch's own copies answer for it: always right, so nothing to fit
    assert fit_decision(x, labels, [str(i) for i in range(len(x))], threshold=0.5) is None
    assert fit_decision(x, ["a"] * len(x), groups, 0.5) is None  # one label: nothing to decide


def test_old_manifests_get_the_default_rule():
    assert rule_of({}) is DEFAULT_RULE and rule_of({"decision": None}) is DEFAULT_RULE
    assert DEFAULT_RULE["fitted"] is False
    mine = {"decision": SURE_AT_8}
    assert rule_of(mine) is SURE_AT_8
    # the default needs all 8 votes and a clear margin for 97%
    assert estimate([1.0, 0.1, 0.05], DEFAULT_RULE) >= 0.97 > estimate([0.75, 0.02, 0.03], DEFAULT_RULE)
    old = decide([hits(("a", 8, 0.95))], 0.9, None, LABELS)
    assert old.kind == "suggestion" and not old.fitted and "(default rule: none could be fitted here)" in old.text()


def test_groups_come_from_a_column_a_csv_or_the_source_file(tmp_path):
    assert near_duplicate_groups(["x", "y"], {"slide": ["s1", "s1"]}) == (["slide:s1", "slide:s1"], "slide")
    assert near_duplicate_groups(["x", "y"], {"group_id": ["g", None]}) == (["group_id:g", "source:y"], "group_id")
    (tmp_path / "gallery" / "a").mkdir(parents=True)
    files = [tmp_path / "gallery" / "a" / f"{i}.jpg" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    (tmp_path / "gallery.csv").write_text("path,label,group_id\ngallery/a/0.jpg,a,g1\ngallery/a/1.jpg,a,g1\n")
    groups, how = near_duplicate_groups([str(f) for f in files])
    assert how == "group_id (CSV)"
    assert groups[0] == groups[1] == f"{tmp_path / 'gallery.csv'}:g1" and groups[2] == f"source:{files[2]}"
    (tmp_path / "linked" / "a").mkdir(parents=True)  # a folder of links: the CSV beside the targets counts
    (tmp_path / "linked" / "a" / "0.jpg").symlink_to(files[0])
    assert near_duplicate_groups([str(tmp_path / "linked" / "a" / "0.jpg")])[0] == [groups[0]]
    assert near_duplicate_groups(["s.svs@0,0", "s.svs@224,0", "t.svs@0,0"])[0] == [
        "source:s.svs",
        "source:s.svs",
        "source:t.svs",
    ]


def test_index_records_the_rule_and_rewrites_refit(tmp_path, tiny_embedder):
    from index_build.patch_index import PatchIndex, write_index
    from index_build.storage import metadata_table

    rng = np.random.default_rng(3)
    d = tiny_embedder.dim
    xb = unit(
        np.concatenate([np.eye(d)[0] * 3 + rng.normal(size=(20, d)), np.eye(d)[1] * 3 + rng.normal(size=(20, d))])
    )
    meta = metadata_table(np.arange(40), ["a"] * 20 + ["b"] * 20, [f"s{i}" for i in range(40)], [b""] * 40)
    write_index(tmp_path / "idx", xb, meta, tiny_embedder)
    index = PatchIndex.load(tmp_path / "idx", tiny_embedder)
    rule = index.manifest["decision"]
    assert rule["fitted"] is True and rule["sample"] == 40 and rule["groups"] == "source file"
    assert index.decision_rule == rule
    assert index.remove([0, 1]) == 2  # every rewrite (append, delete) refits on the changed gallery
    assert PatchIndex.load(tmp_path / "idx", tiny_embedder).manifest["decision"]["sample"] == 38
    stored = PatchIndex.load(tmp_path / "idx", tiny_embedder).manifest["decision"]
    assert stored["sample"] == 38
    old = PatchIndex.load(tmp_path / "idx", tiny_embedder)
    del old.manifest["decision"]  # an index written before the fit: fitted on load, to the same rule
    assert old.decision_rule == dict(stored, computed="on load")
    one_label = PatchIndex.load(tmp_path / "idx", tiny_embedder)
    del one_label.manifest["decision"]
    one_label.row_labels = ["a"] * len(one_label)  # nothing to decide between: the conservative default
    assert one_label.decision_rule is DEFAULT_RULE
