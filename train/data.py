"""Training data: class ids, the paper's augmentations, a seeded per-epoch order.

Every random choice is derived from ``(seed, epoch, index)``, never from a worker's or the
process's global RNG, so the batches of an epoch are identical whatever the number of
DataLoader workers, and a run resumed at an epoch boundary sees exactly the data an
uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageFilter

from image_processing_lgffem import LgffemImageProcessor, to_rgb_uint8
from index_build.data import label_strings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the paper's augmentations (all applied after resizing)."""

    hflip_p: float = 0.5
    vflip_p: float = 0.5
    rot90_p: float = 0.5
    gaussian_blur_p: float = 0.2
    gaussian_sigma: tuple[float, float] = (0.1, 2.0)
    median_blur_p: float = 0.2
    median_sizes: tuple[int, ...] = (3, 5)

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(0.0, 0.0, 0.0, 0.0, (0.1, 2.0), 0.0, (3,))


def augment(image: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
    """Horizontal / vertical flip, rotation by k*90 degrees, Gaussian blur, median blur.

    Each transform is applied with its own probability, in that order. Rotation picks k in
    {1, 2, 3} uniformly; the Gaussian blur sigma is uniform in ``cfg.gaussian_sigma``; the
    median filter size is chosen uniformly from ``cfg.median_sizes``.

    Args:
        image: an 8-bit RGB image (square, so rotations keep its size).
        rng: the generator all random draws come from.
        cfg: probabilities and ranges.
    """
    array = np.asarray(image)
    changed = False
    if rng.random() < cfg.hflip_p:
        array, changed = array[:, ::-1], True
    if rng.random() < cfg.vflip_p:
        array, changed = array[::-1], True
    if rng.random() < cfg.rot90_p:
        array, changed = np.rot90(array, k=int(rng.integers(1, 4))), True
    if changed:
        image = Image.fromarray(np.ascontiguousarray(array))
    if rng.random() < cfg.gaussian_blur_p:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*cfg.gaussian_sigma))))
    if rng.random() < cfg.median_blur_p:
        image = image.filter(ImageFilter.MedianFilter(size=int(rng.choice(cfg.median_sizes))))
    return image


def label_names(dataset) -> list[str]:
    """Sorted distinct class names of a dataset's ``label`` column (ints become their names)."""
    return sorted(set(label_strings(dataset, source="training dataset")))


def seeded_subset(dataset, max_samples: Optional[int], seed: int):
    """A seeded random subset of ``max_samples`` rows (all rows when ``None`` or larger)."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    rows = np.random.default_rng([seed, 0x5EED]).permutation(len(dataset))[:max_samples]
    return dataset.select(sorted(int(r) for r in rows))


class TrainDataset(torch.utils.data.Dataset):
    """A ``datasets`` dataset (``image``, ``label``) -> (pixel tensor, class id), augmented.

    Args:
        dataset: rows with an ``image`` (PIL / array) and a ``label`` column.
        classes: class names; a row's class id is its name's position here.
        processor: resizes and normalises (the model's image size, mean and std).
        augment_cfg: augmentation settings, ``None`` for none.
        seed: base seed of the per-sample augmentation RNG.
    """

    def __init__(
        self,
        dataset,
        classes: Sequence[str],
        processor: LgffemImageProcessor,
        augment_cfg: Optional[AugmentConfig],
        seed: int,
    ) -> None:
        if "image" not in dataset.column_names:
            raise ValueError(f"training dataset needs an 'image' column, has {dataset.column_names}")
        self.dataset = dataset
        self.classes = list(classes)
        index = {name: i for i, name in enumerate(self.classes)}
        strings = label_strings(dataset, source="training dataset")
        unknown = sorted(set(strings) - set(index))
        if unknown:
            raise ValueError(f"labels {unknown[:5]} are not among the classes {self.classes[:10]}")
        self.targets = torch.tensor([index[s] for s in strings], dtype=torch.long)
        self.processor = processor
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = to_rgb_uint8(self.dataset[int(i)]["image"])
        size = (self.processor.image_size, self.processor.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        if self.augment_cfg is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            image = augment(image, rng, self.augment_cfg)
        return torch.from_numpy(self.processor.to_array(image)), self.targets[int(i)]


class EpochSampler(torch.utils.data.Sampler[int]):
    """A random permutation per epoch, seeded by ``(seed, epoch)``.

    Call :meth:`set_epoch` before each epoch; the order does not depend on any global RNG.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())
