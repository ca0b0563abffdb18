"""load_image_dataset: image folders, parquet, Hub datasets (mocked), columns, shards."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from index_build import data as data_module
from index_build.data import load_image_dataset, parse_shard, source_kind


def _write_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for label, ext in (("s0", "png"), ("s1", "jpg"), ("s2", "tif")):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / label / f"{label}_{i}.{ext}")
    return root


def test_imagefolder(tmp_path):
    root = _write_folder(tmp_path / "kimia")
    ds = load_image_dataset(str(root))
    assert ds.column_names == ["image", "label", "source"]
    assert len(ds) == 6
    assert sorted(ds["label"]) == ["s0", "s0", "s1", "s1", "s2", "s2"]
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (24, 20)
    assert Path(row["source"]).is_file() and Path(row["source"]).parent.name == row["label"]
    assert source_kind(str(root)) == "imagefolder"


def test_shard_is_contiguous(tmp_path):
    root = _write_folder(tmp_path / "kimia")
    full = load_image_dataset(str(root))["source"]
    parts = [list(load_image_dataset(str(root), shard=(i, 4))["source"]) for i in range(4)]
    assert [len(p) for p in parts] == [2, 2, 1, 1]
    assert sum(parts, []) == list(full)
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_with_named_columns(tmp_path):
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": _png(v), "path": None} for v in (0, 100, 200)], "kind": ["x", "y", "x"]},
        features=datasets.Features({"img": datasets.Image(), "kind": datasets.Value("string")}),
    )
    path = tmp_path / "patches.parquet"
    table.to_parquet(str(path))
    with pytest.raises(ValueError, match=r"no 'label' column.*\['img', 'kind'\]"):
        load_image_dataset(str(path))
    ds = load_image_dataset(str(path), image_column="img", label_column="kind")
    assert ds["label"] == ["x", "y", "x"]
    assert ds["source"] == [f"{path}:0", f"{path}:1", f"{path}:2"]
    assert np.asarray(ds[1]["image"])[0, 0].tolist() == [100, 100, 100]


def test_hub_dataset_with_class_label_column(monkeypatch):
    """A PanNuke-like Hub dataset: tissue type as a ClassLabel column, several splits."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "tissue": datasets.ClassLabel(names=["Adrenal_gland", "Bile-duct", "Breast"]),
            "instances": datasets.Value("int32"),
        }
    )
    fold = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(v), "path": None} for v in (1, 2, 3)], "tissue": [2, 0, 2], "instances": [5, 6, 7]},
        features=features,
    )
    calls = []

    def fake_load_dataset(path, split=None, revision=None, **kwargs):
        calls.append((path, split, revision))
        return datasets.DatasetDict({"fold1": fold, "fold2": fold}) if split is None else fold

    monkeypatch.setattr(data_module.datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(ValueError, match=r"several splits \['fold1', 'fold2'\]"):
        load_image_dataset("RationAI/PanNuke", label_column="tissue")
    ds = load_image_dataset("RationAI/PanNuke", split="fold1", label_column="tissue", revision="abc")
    assert calls[-1] == ("RationAI/PanNuke", "fold1", "abc")
    assert ds["label"] == ["Breast", "Adrenal_gland", "Breast"]
    assert ds["source"] == ["RationAI/PanNuke:fold1:0", "RationAI/PanNuke:fold1:1", "RationAI/PanNuke:fold1:2"]
    with pytest.raises(ValueError, match=r"label column 'type' not found.*'tissue'"):
        load_image_dataset("RationAI/PanNuke", split="fold1", label_column="type")
    with pytest.raises(ValueError, match=r"image column 'img' not found"):
        load_image_dataset("RationAI/PanNuke", split="fold1", image_column="img", label_column="tissue")


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        load_image_dataset(str(tmp_path / "empty"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="not a .parquet"):
        load_image_dataset(str(tmp_path / "a.csv"))


def test_real_crc_folder(shared_data):
    ds = load_image_dataset(str(shared_data / "crc_samples"))
    assert len(ds) == 41
    assert sorted(set(ds["label"])) == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert sum(s.endswith(".tif") for s in ds["source"]) == 9
