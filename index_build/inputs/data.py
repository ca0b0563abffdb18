"""Reader side of the pipeline: any image collection -> a ``datasets.Dataset`` of (image, label, source).

Three kinds of source are accepted:

- a local image folder laid out as ``class_name/*.png|jpg|jpeg|tif|tiff`` (Kimia Path24C: ``s0..s23``),
  read with ``datasets``' ``imagefolder`` builder;
- a ``.parquet`` file, or a folder holding only parquet files;
- a Hugging Face Hub dataset id (e.g. PanNuke with its tissue-type column as the label), which
  needs network access unless the dataset is already in the local cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import datasets
import pyarrow.compute as pc

from index_build.sources import IMAGE_EXTENSIONS, check_shard, parse_shard, source_kind

logger = logging.getLogger(__name__)

DEFAULT_LOCAL_SPLIT = "train"  # the split name imagefolder / parquet give a folder without split subfolders

__all__ = [
    "IMAGE_EXTENSIONS",
    "folder_layout_problem",
    "label_strings",
    "load_image_dataset",
    "parse_shard",
    "source_kind",
]


def _pick_split(loaded: datasets.Dataset | datasets.DatasetDict, source: str) -> tuple[datasets.Dataset, str]:
    if isinstance(loaded, datasets.Dataset):
        return loaded, str(loaded.split) if loaded.split is not None else DEFAULT_LOCAL_SPLIT
    names = list(loaded.keys())
    if len(names) != 1:
        raise ValueError(f"{source} has several splits {names}; choose one with split=")
    return loaded[names[0]], names[0]


def _load_raw(source: str, kind: str, split: Optional[str], revision: Optional[str]) -> tuple[datasets.Dataset, str]:
    if kind == "imagefolder":
        loaded = datasets.load_dataset("imagefolder", data_dir=os.path.expanduser(source), split=split)
    elif kind == "parquet":
        path = Path(os.path.expanduser(source))
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
        loaded = datasets.load_dataset("parquet", data_files={split or DEFAULT_LOCAL_SPLIT: files}, split=split)
    else:
        loaded = datasets.load_dataset(source, split=split, revision=revision)
    if split is not None:
        return loaded, split
    return _pick_split(loaded, source)


def _image_column(ds: datasets.Dataset, image_column: Optional[str]) -> str:
    columns = list(ds.column_names)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image column {image_column!r} not found; available columns: {columns}")
        return image_column
    if "image" in columns:
        return "image"
    image_columns = [c for c in columns if isinstance(ds.features[c], datasets.Image)]
    if len(image_columns) != 1:
        raise ValueError(f"cannot tell which column holds the images; pass image_column= (available: {columns})")
    return image_columns[0]


def label_strings(ds: datasets.Dataset, label_column: Optional[str] = None, source: str = "dataset") -> list[str]:
    """Every row's label as a class name (``ClassLabel`` ids become their names, values ``str``)."""
    columns = list(ds.column_names)
    if label_column is None:
        if "label" not in columns:
            raise ValueError(f"{source} has no 'label' column; pass label_column= (available: {columns})")
        label_column = "label"
    elif label_column not in columns:
        raise ValueError(f"label column {label_column!r} not found; available columns: {columns}")
    feature = ds.features[label_column]
    values = ds.data.column(label_column).to_pylist()
    if ds._indices is not None:  # noqa: SLF001 - a selected/shuffled dataset: map rows through its indices
        values = [values[i] for i in ds._indices.column(0).to_pylist()]  # noqa: SLF001
    if isinstance(feature, datasets.ClassLabel):
        bad = [i for i, v in enumerate(values) if v is None or v < 0]
        if bad:
            raise ValueError(f"label column {label_column!r} has no label in rows {bad[:10]}")
        return [feature.int2str(int(v)) for v in values]
    if not isinstance(feature, datasets.Value):
        raise ValueError(f"label column {label_column!r} must hold class names or ids, got feature {feature}")
    bad = [i for i, v in enumerate(values) if v is None]
    if bad:
        raise ValueError(f"label column {label_column!r} is empty in rows {bad[:10]}")
    strings = [str(v) for v in values]
    blank = [i for i, v in enumerate(strings) if not v.strip()]
    if blank:
        raise ValueError(
            f"label column {label_column!r} has an empty label in {len(blank)} rows ({blank[:10]}); "
            "every image needs a class name"
        )
    return strings


def _image_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def single_class(root: Path) -> Optional[str]:
    """The class name when every image of ``root`` sits directly in one and the same sub-folder, else ``None``."""
    files = _image_files(root)
    folders = {f.parts[0] if len(f.parts) == 2 else None for f in files}
    return next(iter(folders)) if len(folders) == 1 and None not in folders else None


def folder_layout_problem(root: Path) -> str:
    """Why the imagefolder loader found no classes in ``root``: what is wrong with its layout, and the fix."""
    files = _image_files(root)
    expected = f"put each class's images directly in its own sub-folder ({root}/<class>/*.png)"
    nested = sorted({str(f.parent) for f in files if len(f.parts) > 2})
    loose = [str(f) for f in files if len(f.parts) == 1]
    classes = sorted({f.parts[0] for f in files if len(f.parts) == 2})
    if nested:
        shown = ", ".join(nested[:3]) + (f" and {len(nested) - 3} more" if len(nested) > 3 else "")
        return (
            f"{root} has images in nested sub-folders ({shown}), so no class can be told from the folders: {expected}"
        )
    if loose and not classes:
        return f"{root} has its {len(loose)} images directly in the folder, without class sub-folders: {expected}"
    if loose:
        shown = ", ".join(loose[:3]) + (f" and {len(loose) - 3} more" if len(loose) > 3 else "")
        return f"{root} has images outside its class sub-folders ({shown}): {expected}"
    return f"{root}: no classes could be told from its sub-folders ({len(files)} images): {expected}"


def _sources(ds: datasets.Dataset, image_column: str, kind: str, source: str, split: str) -> list[str]:
    if kind == "hub":
        return [f"{source}:{split}:{row}" for row in range(len(ds))]
    column = ds.data.column(image_column)
    paths: list[Optional[str]]
    if kind == "imagefolder" and ds._indices is None:  # noqa: SLF001
        paths = pc.struct_field(column, "path").to_pylist() if column.type.num_fields else [None] * len(ds)
        if any(p is None for p in paths):
            raise ValueError(f"imagefolder {source} returned rows without a file path")
        return paths
    return [f"{source}:{row}" for row in range(len(ds))]


def load_image_dataset(
    source: str,
    split: Optional[str] = None,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    revision: Optional[str] = None,
    shard: Optional[tuple[int, int]] = None,
) -> datasets.Dataset:
    """Load an image collection as a Dataset with columns ``image``, ``label`` and ``source``.

    Args:
        source: a Hub dataset id, a local image folder (``class_name/*.png|jpg|jpeg|tif|tiff``,
            read with ``datasets``' imagefolder loader) or a ``.parquet`` file / folder of them.
        split: which split; may be omitted when the source has a single split.
        image_column: column holding the images; default ``"image"`` (or the only Image column).
        label_column: column holding the class; default ``"label"``. Class-label ids become
            their names; other values are converted with ``str``.
        revision: Hub dataset revision (branch, tag or commit).
        shard: ``(index, count)``: keep only the ``index``-th of ``count`` contiguous shards.

    Returns:
        A Dataset whose ``image`` column decodes to PIL images, ``label`` holds class names
        (str) and ``source`` the file path (image folders) or ``"{hub_id}:{split}:{row}"``
        (Hub datasets; ``"{file}:{row}"`` for parquet).

    Raises:
        ValueError: a column is missing (the message names the available ones), an image folder
            is not laid out as one sub-folder per class (the message says what is wrong), a label
            is empty, the split is ambiguous, or ``shard`` is invalid.
        FileNotFoundError: a local path does not exist.
    """
    if shard is not None:
        check_shard(shard)
    kind = source_kind(source)
    raw, split_name = _load_raw(source, kind, split, revision)
    image_col = _image_column(raw, image_column)
    if kind == "imagefolder" and label_column is None and "label" not in raw.column_names:
        # datasets' loader gives no labels for a single class folder: that one class is the label
        # (e.g. ``--append more/new_class``); any other layout is an error that says what is wrong
        single = single_class(Path(os.path.expanduser(source)))
        if single is None:
            raise ValueError(folder_layout_problem(Path(os.path.expanduser(source))))
        labels = [single] * len(raw)
    else:
        labels = label_strings(raw, label_column, source)
    sources = _sources(raw, image_col, kind, source, split_name)
    ds = raw.select_columns([image_col])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if not isinstance(ds.features["image"], datasets.Image) or not ds.features["image"].decode:
        ds = ds.cast_column("image", datasets.Image())
    ds = ds.add_column("label", labels).add_column("source", sources)
    if shard is not None:
        ds = ds.shard(num_shards=shard[1], index=shard[0], contiguous=True)
    logger.info("loaded %s (%s, split %s): %d images, %d classes", source, kind, split_name, len(ds), len(set(labels)))
    return ds
