"""Metadata filters (``where=``) and per-case diversity (``per_case=``) in PatchIndex.search, on every index type."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from test_index import ALL_INDEX_TYPES, _clustered, make_embedder

from index_build.patch_index import PatchIndex, write_index

N = 600
ORGANS = ("lung", "colon", "skin")
STAINS = ("HE", "IHC")


@pytest.fixture(scope="module")
def embedder():
    return make_embedder()


def _metadata(n: int = N) -> pa.Table:
    return pa.table(
        {
            "id": pa.array(np.arange(n, dtype=np.int64)),
            "label": pa.array([str(i % 3) for i in range(n)]),
            "source": pa.array([f"s{i}" for i in range(n)]),
            "thumbnail": pa.array([b""] * n, pa.binary()),
            "organ": pa.array([ORGANS[i % 3] for i in range(n)]),
            "stain": pa.array([STAINS[(i // 3) % 2] for i in range(n)]),
            "case": pa.array([f"case{i % 50}" for i in range(n)]),
            "magnification": pa.array([20 if i % 5 else 40 for i in range(n)], pa.int64()),
        }
    )


def _brute(xb: np.ndarray, xq: np.ndarray, rows: np.ndarray, k: int) -> list[list[int]]:
    return rows[np.argsort(-(xq @ xb[rows].T), axis=1, kind="stable")[:, :k]].tolist()


@pytest.mark.parametrize("index_type, params", ALL_INDEX_TYPES, ids=[t for t, _ in ALL_INDEX_TYPES])
def test_a_filter_on_two_columns_returns_only_matching_rows(tmp_path, embedder, index_type, params):
    xb, _ = _clustered(N, d=64)
    write_index(tmp_path / "idx", xb, _metadata(), embedder, index_type, params)
    index = PatchIndex.load(tmp_path / "idx", embedder)
    where = {"organ": "lung", "stain": ["HE"]}
    results = index.search(embeddings=xb[:4], k=5, where=where)
    organ, stain = index.column("organ"), index.column("stain")
    assert all(len(r.ids) == 5 for r in results)
    assert {(organ[i], stain[i]) for r in results for i in r.ids} == {("lung", "HE")}
    if index_type == "flat":
        rows = np.flatnonzero((np.arange(N) % 3 == 0) & ((np.arange(N) // 3) % 2 == 0))
        assert [r.ids for r in results] == _brute(xb, xb[:4], rows, 5)


def test_filters_combine_with_label_and_check_their_input(tmp_path, embedder):
    xb, _ = _clustered(N, d=64)
    index = write_index(tmp_path / "idx", xb, _metadata(), embedder)
    mask = index.where_mask({"organ": ["lung", "skin"], "magnification": 40})
    assert np.flatnonzero(mask).tolist() == [i for i in range(N) if i % 3 != 1 and i % 5 == 0]
    results = index.search(embeddings=xb[:2], k=3, label="0", where={"stain": "IHC"})
    assert all(i % 3 == 0 and (i // 3) % 2 == 1 for r in results for i in r.ids)
    assert index.search(embeddings=xb[:1], k=3, where={"organ": "brain"})[0].ids == []
    with pytest.raises(ValueError, match=r"no metadata column 'site' to filter on; columns: \['label', 'organ'"):
        index.search(embeddings=xb[:1], k=3, where={"site": "x"})
    with pytest.raises(ValueError, match="filter on 'magnification': \\['high'\\] are not int64 values"):
        index.where_mask({"magnification": "high"})
    with pytest.raises(ValueError, match="filter on 'organ': give at least one value"):
        index.where_mask({"organ": []})


def test_per_case_diversity_still_returns_k_results(tmp_path, embedder):
    xb, _ = _clustered(N, d=64)
    index = write_index(tmp_path / "idx", xb, _metadata(), embedder)
    assert index.case_column() == "case"
    case = index.column("case")
    plain = index.search(embeddings=xb[:8], k=10)
    diverse = index.search(embeddings=xb[:8], k=10, per_case=1)
    assert any(len({case[i] for i in p.ids}) < 10 for p in plain)  # without it, cases repeat
    for query, d in enumerate(diverse):
        assert len(d.ids) == 10 and len({case[i] for i in d.ids}) == 10
        assert d.scores == sorted(d.scores, reverse=True)
        # the diverse list is the plain ranking with each case's later results dropped
        full = _brute(xb, xb[query : query + 1], np.arange(N), N)[0]
        seen: set[str] = set()
        expected = [i for i in full if not (case[i] in seen or seen.add(case[i]))][:10]
        assert d.ids == expected
    two = index.search(embeddings=xb[:1], k=12, per_case=2, where={"organ": "colon"})[0]
    counts = {c: [case[i] for i in two.ids].count(c) for c in {case[i] for i in two.ids}}
    assert len(two.ids) == 12 and max(counts.values()) <= 2
    # 50 cases, one result each at most: asking for 60 gives the 50 there are
    assert len(index.search(embeddings=xb[:1], k=60, per_case=1)[0].ids) == 50
    with pytest.raises(ValueError, match="per_case must be >= 1, got 0"):
        index.search(embeddings=xb[:1], k=3, per_case=0)


def test_cli_metadata_csv_becomes_typed_columns_that_search_filters_on(tmp_path, monkeypatch, embedder):
    from test_index import write_folder

    import index_build.models as models
    from index_build.__main__ import main as build_main

    monkeypatch.setattr(models, "load_model", lambda model=None, device=None, revision=None: embedder)
    folder = write_folder(tmp_path / "patches")  # red/, green/, blue/: 4 patches each
    csv = tmp_path / "meta.csv"
    lines = ["file,organ,case,magnification,score"]
    for label in ("red", "green", "blue"):
        ext = "jpg" if label == "blue" else "png"
        for i in range(4):
            organ = "lung" if i < 2 else "colon"
            lines.append(f"{label}_{i}.{ext},{organ},{label}-case{i % 2},{20 if i else ''},{i / 2}")
    csv.write_text("\n".join(lines) + "\n")
    quiet = ["--num-workers", "0", "--no-progress"]
    index = build_main([str(folder), "--out", str(tmp_path / "idx"), "--metadata", str(csv), *quiet])
    assert index.extra_columns == ["organ", "case", "magnification", "score"]
    types = {f.name: str(f.type) for f in index.metadata_table().schema}
    assert (types["organ"], types["magnification"], types["score"]) == ("string", "int64", "double")
    organ = dict(zip(index.sources, index.column("organ")))
    assert organ[next(s for s in index.sources if s.endswith("red_3.png"))] == "colon"
    assert sorted(set(index.column("magnification")), key=str) == [20, None]
    xq = index.reconstruct_all()[:3]
    results = index.search(embeddings=xq, k=4, where={"organ": "lung", "label": ["red", "blue"]})
    assert all(len(r.ids) == 4 for r in results)
    assert {(index.row_labels[i], index.column("organ")[i]) for r in results for i in r.ids} <= {
        ("red", "lung"),
        ("blue", "lung"),
    }
    one_each = index.search(embeddings=xq, k=6, per_case=1)  # 6 cases: one result of each
    cases = sorted(set(index.column("case")))
    assert len(cases) == 6 and all(sorted(index.column("case")[i] for i in r.ids) == cases for r in one_each)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,organ\nred_0.png,lung\nred_9.png,lung\n")
    with pytest.raises(SystemExit, match="1 file values match no row of the dataset: red_9.png"):
        build_main([str(folder), "--out", str(tmp_path / "idx2"), "--metadata", str(bad), *quiet])
    bad.write_text("slide,organ\nred_0.png,lung\n")
    with pytest.raises(SystemExit, match="needs a header with a 'file' column"):
        build_main([str(folder), "--out", str(tmp_path / "idx2"), "--metadata", str(bad), *quiet])
