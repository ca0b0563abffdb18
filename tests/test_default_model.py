"""The shipped default model: its weights file, what it loads into, and what its scores mean."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.score_separation import photo_crops
from index_build import models
from index_build.metrics import auroc
from modeling_lgffem import LgffemConfig, LgffemModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "lc25000_lung").is_dir(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def default():
    return models.default_model()


def test_shipped_file_is_the_recorded_one_and_small():
    assert models.DEFAULT_WEIGHTS.is_file()
    assert models.file_sha256(models.DEFAULT_WEIGHTS) == models.DEFAULT_WEIGHTS_SHA256
    assert models.DEFAULT_WEIGHTS.stat().st_size <= 5_000_000
    assert (models.DEFAULT_WEIGHTS.parent / "README.md").is_file()  # the model card


def test_shipped_file_loads_into_exactly_the_declared_architecture(default):
    from safetensors import safe_open

    with safe_open(str(models.DEFAULT_WEIGHTS), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    # the default architecture with the global branch at weight 0.75 (issue 19): 512 + 320 dims
    assert json.loads(meta["config"]) == models.architecture(LgffemConfig(global_weight=0.75))
    assert default.embedding_dim == 832 and default.config.global_weight == 0.75
    expected = {k for k in LgffemModel(LgffemConfig()).state_dict() if not k.startswith("backbone.")}
    assert keys == expected
    trained = sum(default.state_dict()[k].numel() for k in keys)
    assert 900_000 < trained < 1_100_000  # neck 842,116 + head 133,124 parameters, plus BatchNorm buffers
    # the backbone is the PyPI package's ImageNet Lite0, untouched
    untrained = models.untrained_model()
    for key, value in untrained.backbone.state_dict().items():
        assert torch.equal(default.backbone.state_dict()[key], value), key
    # the neck and head are trained: not the seeded initialisation
    assert not torch.equal(default.neck.proj[0][0].weight, untrained.neck.proj[0][0].weight)


def test_a_changed_file_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "lgffem-default.safetensors"
    data = bytearray(models.DEFAULT_WEIGHTS.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(models, "DEFAULT_WEIGHTS", copy)
    with pytest.raises(ValueError, match="SHA-256"):
        models.default_model()
    copy.unlink()
    with pytest.raises(FileNotFoundError, match="make model"):
        models.default_model()


def test_load_model_names(default):
    assert models.load_model("default", device="cpu").fingerprint == models.state_fingerprint(default)
    untrained = models.load_model("untrained", device="cpu")
    assert untrained.model_id == "untrained"
    assert untrained.fingerprint == models.state_fingerprint(models.untrained_model())
    assert untrained.fingerprint != models.state_fingerprint(default)


def test_save_pretrained_of_the_default_is_a_complete_hub_folder(default, tmp_path):
    default.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_lgffem.py",
    }
    loaded = LgffemModel.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x).embeddings, default(x).embeddings, rtol=0, atol=1e-6)


def _files(folder: Path, every: int) -> list[Path]:
    return sorted(p for p in folder.rglob("*.jpg"))[::every]


@needs_data
def test_top1_similarity_separates_tissue_queries_from_photographs(default):
    """In-domain queries (never trained on) against a third of the lung and colon galleries vs crops
    of photographs: the best similarity tells them apart (AUROC >= 0.95)."""
    embedder = models.Embedder(model=default, processor=models.LgffemImageProcessor.from_config(default.config))
    gallery = _files(DATA / "lc25000_lung" / "gallery", 3) + _files(DATA / "lc25000_colon" / "gallery", 3)
    queries = _files(DATA / "lc25000_lung" / "query", 9) + _files(DATA / "lc25000_colon" / "query", 4)
    xb = embedder.embed_images([Image.open(p) for p in gallery])
    xq = embedder.embed_images([Image.open(p) for p in queries])
    xo = embedder.embed_images(photo_crops())
    top_in, top_out = (xq @ xb.T).max(axis=1), (xo @ xb.T).max(axis=1)
    assert len(top_in) == 100 and len(top_out) == 40
    assert auroc(top_in, top_out) >= 0.95


@needs_data
def test_the_page_says_no_close_match_for_lymphocytes_and_suggests_lung_classes(default, tmp_path):
    """End to end on the whole lung gallery, indexed as ``python -m index_build`` does and searched
    through the app: colon lymphocyte tiles (another dataset, a tissue the gallery lacks) get "no close
    match"; lung queries (never trained on) get a suggestion, and it is their class."""
    from app import SearchApp
    from index_build.data import load_image_dataset
    from index_build.embedding import build_index

    embedder = models.Embedder(model=default, processor=models.LgffemImageProcessor.from_config(default.config))
    gallery = load_image_dataset(str(DATA / "lc25000_lung" / "gallery"))
    build_index(gallery, tmp_path / "lung", embedder, num_workers=1, progress=False)
    app = SearchApp.create(index=str(tmp_path / "lung"), data_dir=tmp_path / "data", embedder=embedder)
    threshold = app.index.close_match_threshold
    assert 0.75 < threshold < 0.85  # 0.816 for the shipped default (its descriptor carries the global branch)

    no_match = "### No close match in this gallery"
    lymphocytes = sorted((DATA / "crc_samples" / "LYM").iterdir())
    outcomes = [app.search(str(p)).summary.startswith(no_match) for p in lymphocytes]

    suggested = {}
    for cls in ("lung_aca", "lung_n", "lung_scc"):
        for path in sorted((DATA / "lc25000_lung" / "query" / cls).glob("*.jpg"))[:10]:
            summary = app.search(str(path)).summary
            headline = summary.splitlines()[0].replace("\\", "")  # the Markdown escapes "_"
            # a lung query gets a lung suggestion, or a close call between lung classes (calibrated verdict)
            assert headline.startswith(("### Suggestion: **lung_", "### Close call: lung_")), summary
            if headline.startswith("### Close call:"):
                assert all(name.startswith("lung_") for name in headline[16:].split(" or ")), summary
            guess = headline.split("**")[1] if headline.startswith("### Suggestion") else None
            suggested[path.name] = (cls, guess)
    right = sum(cls == guess for cls, guess in suggested.values())
    wrong = sum(guess is not None and cls != guess for cls, guess in suggested.values())
    # two of the five lymphocyte tiles score above the lung gallery's threshold, and neither gets a
    # suggestion: the calibrated verdict calls them close calls between two lung classes; of the 30 lung
    # queries, 28 get their class as suggestion, 2 a close call between two lung classes, none a wrong one
    headlines = [app.search(str(p)).summary.splitlines()[0] for p in lymphocytes]
    assert not any(line.startswith("### Suggestion") for line in headlines), headlines
    assert (outcomes, right, wrong) == ([True, False, False, True, True], 28, 0)
