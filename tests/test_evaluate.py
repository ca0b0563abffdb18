"""Evaluation protocol: hand-computed cases with a lookup embedder, the CLI, and the baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from index_build.data import load_image_dataset
from index_build.evaluate import BackboneEmbedder, evaluate, format_table, tiled_retrieval
from index_build.evaluate import main as evaluate_main
from index_build.index import PatchIndex, build_index
from index_build.models import Embedder
from index_build.search_core import Query, run_query
from modeling_lgffem import LgffemConfig, LgffemImageProcessor, LgffemModel

# grey value of a constant image -> its 2-d embedding
TABLE = {
    10: (1.0, 0.0),
    20: (0.8, 0.6),
    30: (0.6, 0.8),
    40: (0.0, 1.0),
    50: (0.96, 0.28),
    60: (0.28, 0.96),
    70: (1.0, 0.0),
}
GALLERY = {"A": (10, 20), "B": (30, 40)}
QUERIES = {"A": (50,), "B": (60, 70)}


class LookupEmbedder:
    """Embeds a constant grey image by looking its value up in TABLE (exactly controllable)."""

    def __init__(self) -> None:
        self.processor = LgffemImageProcessor(image_size=32)
        self.device = torch.device("cpu")
        self.dim = 2

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        values = torch.round((pixels[:, 0, 0, 0] * 0.5 + 0.5) * 255).int().tolist()
        return np.asarray([TABLE[v] for v in values], dtype=np.float32)

    def describe(self) -> dict:
        return {"model": "lookup", "config_hash": "lookup", "weights_fingerprint": "none", "embedding_dim": 2}


def _folder(root: Path, spec: dict) -> Path:
    for label, values in spec.items():
        (root / label).mkdir(parents=True)
        for v in values:
            Image.new("RGB", (32, 32), (v, v, v)).save(root / label / f"{v}.png")
    return root


@pytest.fixture()
def gallery(tmp_path):
    return load_image_dataset(str(_folder(tmp_path / "gallery", GALLERY)))


@pytest.fixture()
def queries(tmp_path):
    return load_image_dataset(str(_folder(tmp_path / "queries", QUERIES)))


def test_queries_against_gallery_hand_computed(gallery, queries):
    # rankings: q50(A): 10A 20A 30B | q60(B): 40B 30B 20A | q70(B): 10A 20A 30B
    m = evaluate(LookupEmbedder(), gallery, queries, k=3, num_workers=0, progress=False)
    assert m["recall@1"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["mmv@3"] == pytest.approx(2 / 3)
    assert m["map@3"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert m["eta_p"] == pytest.approx(2 / 3)
    assert m["eta_w"] == pytest.approx((1 + 0.5) / 2)
    assert m["eta_total"] == pytest.approx(0.5)
    assert m["per_class_recall@1"] == {"A": 1.0, "B": 0.5}
    assert (m["n_gallery"], m["n_queries"]) == (4, 3)
    assert m["queries_per_s"] > 0
    # the verdict reads all 4 patches (8 wanted): 2 of each label, so every query is a close call (a
    # 4-patch gallery is too small for a fit: the default rule, which needs near-unanimous votes)
    assert (m["verdict_coverage"], m["verdict_precision"], m["verdict_kinds"]) == (0.0, None, {"close_call": 3})


def test_leave_one_out_hand_computed(gallery):
    # g10: 20A 30B | g20: 30B 10A | g30: 20A 40B | g40: 30B 20A  (self excluded)
    m = evaluate(LookupEmbedder(), gallery, k=2, leave_one_out=True, num_workers=0, progress=False)
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(1.0)
    assert m["mmv@2"] == pytest.approx(0.5)  # ties go to the first-ranked label
    assert m["map@2"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    assert (m["eta_p"], m["eta_w"], m["eta_total"]) == pytest.approx((0.5, 0.5, 0.25))
    assert (m["n_gallery"], m["n_queries"]) == (4, 4)


def test_index_directory_as_gallery(gallery, queries, tmp_path):
    embedder = LookupEmbedder()
    index = build_index(gallery, tmp_path / "idx", embedder, num_workers=0, progress=False)
    loaded = PatchIndex.load(tmp_path / "idx", embedder)
    direct = evaluate(embedder, gallery, queries, k=3, num_workers=0, progress=False)
    via_index = evaluate(embedder, loaded, queries, k=3, num_workers=0, progress=False)
    for key in ("recall@1", "recall@3", "mmv@3", "map@3", "eta_total"):
        assert via_index[key] == pytest.approx(direct[key])
    loo = evaluate(embedder, index, k=2, leave_one_out=True, num_workers=0, progress=False)
    assert loo["map@2"] == pytest.approx(0.75)


def test_bad_arguments(gallery, queries):
    with pytest.raises(ValueError, match="leave_one_out"):
        evaluate(LookupEmbedder(), gallery)
    with pytest.raises(ValueError, match="leave_one_out"):
        evaluate(LookupEmbedder(), gallery, queries, leave_one_out=True)
    with pytest.raises(ValueError, match="too few"):
        evaluate(LookupEmbedder(), gallery, queries, k=5, num_workers=0, progress=False)


def test_format_table():
    m = {"recall@1": 0.5, "recall@5": 1.0, "mmv@5": 0.25, "map@5": 0.75, "eta_p": 0.5, "eta_w": 0.5}
    m.update(eta_total=0.25, queries_per_s=12.345, n_gallery=4, n_queries=2)
    lines = format_table([("m", m)]).splitlines()
    assert lines[0].startswith("| model | n_gallery | n_queries | Recall@1 | Recall@5 | mMV@5 | mAP@5 | η_p")
    assert lines[2] == "| m | 4 | 2 | 0.5000 | 1.0000 | 0.2500 | 0.7500 | 0.5000 | 0.5000 | 0.2500 | - | - | 12.3 |"


@pytest.fixture(scope="module")
def tiny_embedder() -> Embedder:
    torch.set_num_threads(2)
    config = LgffemConfig(neck_channels=16, neck_layers=1, image_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LgffemModel(config).eval()
    return Embedder(model=model, processor=LgffemImageProcessor.from_config(config), model_id="tiny")


@pytest.mark.parametrize("pooling", ["gap", "gem"])
def test_backbone_baseline(tiny_embedder, pooling):
    baseline = BackboneEmbedder(tiny_embedder, pooling)
    assert baseline.dim == 320  # EfficientNet-Lite0's last stage
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = tiny_embedder.model.backbone(pixels)[-1]
    pooled = last.mean((-2, -1)) if pooling == "gap" else last.clamp(min=1e-6).pow(3).mean((-2, -1)).pow(1 / 3)
    expected = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    np.testing.assert_allclose(baseline.embed_pixels(pixels), expected, atol=1e-5)
    desc = baseline.describe()
    assert desc["embedding_dim"] == 320
    assert desc["model"] == f"tiny#baseline-{pooling}" + ("-p3" if pooling == "gem" else "")
    assert desc["config_hash"] != tiny_embedder.config_hash
    with pytest.raises(ValueError, match="pooling"):
        BackboneEmbedder(tiny_embedder, "max")


def test_cli_json_and_baseline(gallery, queries, tmp_path, monkeypatch, capsys, tiny_embedder):
    import index_build.models as models

    monkeypatch.setattr(models, "load_model", lambda model=None, device=None, revision=None: tiny_embedder)
    g, q = str(tmp_path / "gallery"), str(tmp_path / "queries")
    out = tmp_path / "m.json"
    m = evaluate_main(
        [
            "--gallery",
            g,
            "--queries",
            q,
            "--k",
            "3",
            "--num-workers",
            "0",
            "--no-progress",
            "--json",
            str(out),
            "--per-class",
        ]
    )
    printed = capsys.readouterr().out
    assert "| tiny | 4 | 3 |" in printed and "| A | " in printed
    saved = json.loads(out.read_text())
    assert saved["recall@1"] == m["recall@1"] and saved["n_queries"] == 3 and saved["baseline"] is None
    m = evaluate_main(
        ["--gallery", g, "--leave-one-out", "--k", "2", "--baseline", "gap", "--num-workers", "0", "--no-progress"]
    )
    assert m["model"] == "tiny#baseline-gap" and m["n_queries"] == 4
    for bad in (["--gallery", g], ["--gallery", g, "--queries", q, "--leave-one-out"], ["--gallery", g, "--x"]):
        with pytest.raises(SystemExit):
            evaluate_main(bad)


def test_real_crc_leave_one_out_baseline(shared_data, tiny_embedder):
    """Smoke test on real tissue: the pipeline reads PNG and TIFF tiles and returns sane numbers."""
    ds = load_image_dataset(str(shared_data / "crc_samples"))
    m = evaluate(BackboneEmbedder(tiny_embedder, "gap"), ds, k=5, leave_one_out=True, num_workers=0, progress=False)
    assert m["n_queries"] == m["n_gallery"] == 41
    assert 0.0 <= m["map@5"] <= 1.0 and m["recall@1"] <= m["recall@5"]


# --------------------------------------------------------------------------------------
# Tiled queries: the search of the app (index_build.query) on large query images
# --------------------------------------------------------------------------------------


def _expected_tiled_labels(index: PatchIndex, embedder, images, k: int) -> list[list[str]]:
    """The ranked labels the app's tiled search shows for each query image (the query core over the index)."""
    found = [run_query(Query.picture(image), [("index", index)], k, embedder=embedder) for image in images]
    return [[h.label for h in result.hits] for result in found]


def _tiled_case(tmp_path, tiny_embedder, gallery_images: dict, query_images: dict, k: int):
    """Write gallery and query folders, build the gallery index, evaluate with tiles both ways."""
    for root, spec in (("gallery", gallery_images), ("queries", query_images)):
        for label, images in spec.items():
            (tmp_path / root / label).mkdir(parents=True)
            for i, image in enumerate(images):
                image.save(tmp_path / root / label / f"{i}.png")
    gallery_ds = load_image_dataset(str(tmp_path / "gallery"))
    queries_ds = load_image_dataset(str(tmp_path / "queries"))
    index = build_index(gallery_ds, tmp_path / "idx", tiny_embedder, num_workers=0, progress=False)
    via_index = evaluate(tiny_embedder, index, queries_ds, k=k, num_workers=0, progress=False, tile=True)
    direct = evaluate(tiny_embedder, gallery_ds, queries_ds, k=k, num_workers=0, progress=False, tile=True)
    images = [row["image"].convert("RGB") for row in queries_ds]
    expected = _expected_tiled_labels(index, tiny_embedder, images, k)
    retrieved, labels, _seconds, tiles, _ids = tiled_retrieval(
        queries_ds, tiny_embedder, index.search_embeddings, index.row_labels, k, progress=False
    )
    assert retrieved.tolist() == expected  # the evaluation ranks exactly what the page shows
    assert labels == list(queries_ds["label"])
    for key in ("recall@1", f"recall@{k}", f"mmv@{k}", f"map@{k}"):
        assert via_index[key] == pytest.approx(direct[key], abs=1e-6)
    return via_index, tiles


def test_tiled_evaluation_synthetic(tmp_path, tiny_embedder):
    """300 x 300 colour queries on a 64 px model: 5 x 5 = 25 tiles each, ranked like the app."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}

    def patch(colour, size):
        noise = rng.integers(-30, 30, (size, size, 3))
        return Image.fromarray(np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8))

    gallery_images = {label: [patch(c, 64) for _ in range(4)] for label, c in colours.items()}
    query_images = {label: [patch(c, 300)] for label, c in colours.items()}
    metrics, tiles = _tiled_case(tmp_path, tiny_embedder, gallery_images, query_images, k=3)
    assert tiles == 3 * 25 and metrics["tiles_per_query"] == 25
    assert metrics["n_queries"] == 3 and metrics["n_gallery"] == 12
    with pytest.raises(ValueError, match="tile needs queries"):
        evaluate(tiny_embedder, load_image_dataset(str(tmp_path / "gallery")), leave_one_out=True, tile=True)


def test_tiled_evaluation_on_real_1000px_queries(shared_data, tmp_path, tiny_embedder):
    """1000 x 1000 H&E queries (the size of Kimia Path24C's test patches): shrunk to 384 px, 36 tiles."""
    slide = shared_data / "slides" / "target_image.png"
    if not slide.is_file():
        pytest.skip(f"{slide} not found")
    target = Image.open(slide).convert("RGB")
    assert target.size == (1000, 1000)
    halves = {"left": target.crop((0, 0, 500, 1000)), "right": target.crop((500, 0, 1000, 1000))}
    gallery_images = {
        name: [half.crop((x, y, x + 160, y + 160)) for x in (0, 170, 340) for y in (0, 420, 840)]
        for name, half in halves.items()
    }
    query_images = {"left": [target], "right": [target.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]}
    metrics, tiles = _tiled_case(tmp_path, tiny_embedder, gallery_images, query_images, k=5)
    assert tiles == 2 * 36 and metrics["n_queries"] == 2 and metrics["n_gallery"] == 18


def test_cli_tile(gallery, queries, tmp_path, monkeypatch, capsys, tiny_embedder):
    import index_build.models as models

    monkeypatch.setattr(models, "load_model", lambda model=None, device=None, revision=None: tiny_embedder)
    g, q = str(tmp_path / "gallery"), str(tmp_path / "queries")
    m = evaluate_main(["--gallery", g, "--queries", q, "--k", "2", "--tile", "--num-workers", "0", "--no-progress"])
    assert m["tiles_per_query"] == 1 and m["n_queries"] == 3  # 32 px queries are searched whole
    with pytest.raises(SystemExit) as err:
        evaluate_main(["--gallery", g, "--leave-one-out", "--tile"])
    assert err.value.code == 2 and "--tile needs --queries" in capsys.readouterr().err
