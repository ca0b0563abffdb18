"""Cached backbone features: train the neck and head without running the frozen backbone again.

The backbone is frozen and runs in eval mode, so its feature maps depend only on the image it
sees. The paper's flips and 90-degree rotations are a choice among the eight elements of the
dihedral group D4, so each training image has at most eight distinct inputs under those
transforms. :class:`FeatureCache` keeps the backbone's maps of each (image, D4 element) pair the
first time an epoch draws it (float16 by default) and serves them on every later draw.

Blur is the one augmentation outside D4. In the cached path every (image, D4 element) pair gets
its blur drawn once, from a generator seeded by ``(seed, image, element)``, so each image has a
fixed pool of eight augmented views: an epoch draws one of them, with the recipe's flip and
rotation probabilities. The plain path (``--feature-cache off``) draws blur afresh every epoch.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageFilter

from image_processing_lgffem import LgffemImageProcessor, to_rgb_uint8
from train.data import AugmentConfig

logger = logging.getLogger(__name__)

NUM_VIEWS = 8  # |D4|


def dihedral(array: np.ndarray, view: int) -> np.ndarray:
    """Apply D4 element ``view`` (0..7) to an H x W (x C) array: transpose first when
    ``view & 4``, then rotate by ``(view & 3) * 90`` degrees counter-clockwise."""
    if not 0 <= view < NUM_VIEWS:
        raise ValueError(f"view must be in 0..7, got {view}")
    if view & 4:
        array = np.swapaxes(array, 0, 1)
    return np.rot90(array, k=view & 3)


def compose_view(hflip: bool, vflip: bool, rot90: int) -> int:
    """The D4 element of "horizontal flip, then vertical flip, then rotate by ``rot90`` quarter
    turns" (the order of :func:`train.data.augment`), as a :func:`dihedral` index."""
    probe = np.arange(4).reshape(2, 2)
    if hflip:
        probe = probe[:, ::-1]
    if vflip:
        probe = probe[::-1]
    probe = np.rot90(probe, k=rot90)
    for view in range(NUM_VIEWS):
        if np.array_equal(dihedral(np.arange(4).reshape(2, 2), view), probe):
            return view
    raise AssertionError("unreachable: D4 is closed")  # pragma: no cover


def draw_views(num_images: int, seed: int, epoch: int, cfg: Optional[AugmentConfig]) -> np.ndarray:
    """The D4 element each image gets in ``epoch``, drawn with the recipe's flip and rotation
    probabilities from a generator seeded by ``(seed, epoch)``; all zero without augmentation."""
    if cfg is None:
        return np.zeros(num_images, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, 0xD4])
    hflip = rng.random(num_images) < cfg.hflip_p
    vflip = rng.random(num_images) < cfg.vflip_p
    rotate = rng.random(num_images) < cfg.rot90_p
    turns = np.where(rotate, rng.integers(1, 4, num_images), 0)
    table = {(h, v, r): compose_view(h, v, r) for h in (False, True) for v in (False, True) for r in range(4)}
    return np.array([table[(bool(h), bool(v), int(r))] for h, v, r in zip(hflip, vflip, turns)], dtype=np.int64)


def view_image(image: Image.Image, view: int, seed: int, index: int, cfg: Optional[AugmentConfig]) -> Image.Image:
    """Image ``index`` under D4 element ``view`` with the blur drawn once for that pair."""
    out = Image.fromarray(np.ascontiguousarray(dihedral(np.asarray(image), view))) if view else image
    if cfg is None:
        return out
    rng = np.random.default_rng([seed, index, view, 0xB1])
    if rng.random() < cfg.gaussian_blur_p:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*cfg.gaussian_sigma))))
    if rng.random() < cfg.median_blur_p:
        out = out.filter(ImageFilter.MedianFilter(size=int(rng.choice(cfg.median_sizes))))
    return out


class ViewDataset(torch.utils.data.Dataset):
    """(image index, view) pairs -> normalised pixel tensors, for filling the cache."""

    def __init__(
        self,
        dataset,
        pairs: Sequence[tuple[int, int]],
        processor: LgffemImageProcessor,
        cfg: Optional[AugmentConfig],
        seed: int,
    ) -> None:
        self.dataset, self.pairs, self.processor, self.cfg, self.seed = dataset, list(pairs), processor, cfg, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> torch.Tensor:
        index, view = self.pairs[j]
        image = to_rgb_uint8(self.dataset[int(index)]["image"])
        size = (self.processor.image_size, self.processor.image_size)
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
        return torch.from_numpy(self.processor.to_array(view_image(image, view, self.seed, index, self.cfg)))


class FeatureCache:
    """The frozen backbone's four maps per (image, D4 element), filled on first use.

    Storage is one tensor per level of shape ``(num_images * 8, C, H, W)``; it is allocated
    empty, so memory grows only with the pairs actually drawn.
    """

    def __init__(self, num_images: int, shapes: Sequence[tuple[int, int, int]], dtype: torch.dtype) -> None:
        self.num_images = int(num_images)
        self.dtype = dtype
        self.levels = [torch.empty((self.num_images * NUM_VIEWS, *shape), dtype=dtype) for shape in shapes]
        self.filled = np.zeros((self.num_images, NUM_VIEWS), dtype=bool)

    @property
    def nbytes_filled(self) -> int:
        """Bytes of the pairs filled so far."""
        per_pair = sum(level[0].numel() * level.element_size() for level in self.levels)
        return int(self.filled.sum()) * per_pair

    def missing(self, indices: Sequence[int], views: Sequence[int]) -> list[tuple[int, int]]:
        """The distinct (image, view) pairs among these that are not cached yet, in order."""
        seen, out = set(), []
        for i, v in zip(indices, views):
            key = (int(i), int(v))
            if not self.filled[key] and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def put(self, pairs: Sequence[tuple[int, int]], maps: Sequence[torch.Tensor]) -> None:
        rows = torch.tensor([i * NUM_VIEWS + v for i, v in pairs], dtype=torch.long)
        for level, m in zip(self.levels, maps):
            level[rows] = m.to("cpu", self.dtype)
        for i, v in pairs:
            self.filled[i, v] = True

    def get(self, indices: torch.Tensor, views: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """Float32 maps of these pairs, on ``device``."""
        rows = indices.long() * NUM_VIEWS + views.long()
        if not self.filled[indices.numpy(), views.numpy()].all():
            raise KeyError("feature cache: a requested (image, view) pair was never filled")
        return [level[rows].to(device, torch.float32, non_blocking=True) for level in self.levels]

    @torch.inference_mode()
    def fill(
        self,
        model,
        dataset,
        pairs: Sequence[tuple[int, int]],
        processor: LgffemImageProcessor,
        cfg: Optional[AugmentConfig],
        seed: int,
        device: torch.device,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = False,
        autocast=None,
    ) -> None:
        """Run the backbone over ``pairs`` and store its maps.

        Runs on a forked CPU RNG: its DataLoader draws a seed from torch's generator, which would
        otherwise shift the training's dropout masks away from the plain path's.
        """
        if not pairs:
            return
        from tqdm.auto import tqdm

        loader = torch.utils.data.DataLoader(
            ViewDataset(dataset, pairs, processor, cfg, seed),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=worker_init_fn(),
        )
        done = 0
        bar = tqdm(total=len(pairs), desc="backbone features", disable=not progress, dynamic_ncols=True, leave=False)
        with torch.random.fork_rng(devices=[]):  # the loader's seed draw must not move the training's RNG
            for pixels in loader:
                pixels = pixels.to(device, non_blocking=True)
                if autocast is not None:
                    with autocast():
                        maps = model.backbone_features(pixels)
                else:
                    maps = model.backbone_features(pixels)
                self.put(pairs[done : done + len(pixels)], maps)
                done += len(pixels)
                bar.update(len(pixels))
        bar.close()


def worker_init_fn() -> functools.partial:
    """``worker_init_fn`` for a DataLoader created in this process: one thread per worker, and the
    worker dies with this process, even when it is killed while the worker is still starting."""
    return functools.partial(_worker_init, parent=os.getpid())


def _worker_init(worker_id: int, parent: Optional[int] = None) -> None:
    from index_build.embedding import die_with_parent

    torch.set_num_threads(1)
    die_with_parent(worker_id, parent=parent)  # exits at once if the parent is already gone


def gap_descriptor(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bare backbone's descriptor: global average pool of the last map, L2-normalised
    (the evaluation's ``--baseline gap``)."""
    return torch.nn.functional.normalize(maps[-1].float().mean(dim=(2, 3)), dim=1)


def relational_distillation(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mode: str = "kl"
) -> torch.Tensor:
    """How far the student's in-batch similarity structure is from the teacher's.

    ``mode="kl"``: for each image, ``softmax(cos(anchor, others) / temperature)`` over the other
    images of the batch is computed from both descriptors; the loss is the mean
    KL(teacher || student) (neighbourhoods only). ``mode="mse"``: the mean squared difference of
    the two cosine-similarity matrices off the diagonal (the similarity values themselves).
    Either keeps the student close to the generic backbone, which holds the embedding general
    while the class loss separates the classes.
    """
    s = torch.nn.functional.normalize(student.float(), dim=1)
    t = torch.nn.functional.normalize(teacher.float(), dim=1)
    eye = torch.eye(len(s), dtype=torch.bool, device=s.device)
    if mode == "mse":
        return ((s @ s.T - t @ t.T)[~eye] ** 2).mean()
    if mode != "kl":
        raise ValueError(f"distillation mode must be 'kl' or 'mse', got {mode!r}")
    log_s = torch.log_softmax((s @ s.T / temperature).masked_fill(eye, -1e4), dim=1)
    log_t = torch.log_softmax((t @ t.T / temperature).masked_fill(eye, -1e4), dim=1)
    return torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
