"""Where a ``--model``, ``--index`` or dataset argument points: a local path or a Hugging Face Hub id.

One rule for the whole project (:func:`is_hub_id`): an argument that exists on disk is local;
otherwise it is a Hub id when it has a Hub id's shape (``name`` or ``org/name``, not starting
with ``/``, ``.`` or ``~``); anything else is a local path that does not exist, which
:func:`check_source` reports before any model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "MODEL_REVISION_ENV",
    "check_shard",
    "check_source",
    "env_model_revision",
    "is_default_model",
    "is_hub_id",
    "parse_shard",
    "public_dataset_source",
    "resolve_index_dir",
    "source_kind",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_LOCAL_SUFFIXES = (".parquet",)
DEFAULT_MODEL = "default"  # the shipped default model (``weights/``), the ``--model`` default everywhere
MODEL_REVISION_ENV = "LGFFEM_MODEL_REVISION"


def is_default_model(spec: Optional[str]) -> bool:
    """Whether a ``--model`` argument means the shipped default (``None``, empty or ``default``)."""
    return spec in (None, "", DEFAULT_MODEL)


def env_model_revision() -> Optional[str]:
    """The Hub model revision pinned by ``$LGFFEM_MODEL_REVISION`` (``None`` when unset or empty)."""
    return os.environ.get(MODEL_REVISION_ENV) or None


def is_hub_id(spec: Optional[str]) -> bool:
    """Whether ``spec`` names a Hub repo rather than a local path.

    ``True`` for ``"name"`` or ``"org/name"`` that does not exist on disk; ``False`` for existing
    paths, empty values, anything starting with ``/``, ``.`` or ``~``, with more than one ``/``,
    or ending in a local file suffix (``.parquet``).
    """
    if not spec or os.path.exists(os.path.expanduser(spec)):
        return False
    return not (spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.lower().endswith(_LOCAL_SUFFIXES))


def public_dataset_source(spec: str) -> str:
    """``--dataset`` as a manifest records it: a Hub id as it is, a local path as the name of its folder
    or file only (``/home/me/data/colon`` -> ``colon``), so that a published index names no path of
    the machine it was built on."""
    if is_hub_id(spec):
        return spec
    return Path(os.path.expanduser(spec)).resolve().name or spec


def check_source(spec: str, what: str = "path") -> None:
    """Raise ``FileNotFoundError`` when ``spec`` is neither an existing path nor a Hub id.

    Args:
        spec: the argument.
        what: how to call it in the message (``"model directory"``, ``"dataset path"``, ...).
    """
    if not os.path.exists(os.path.expanduser(spec)) and not is_hub_id(spec):
        raise FileNotFoundError(f"{what} not found: {spec}")


def resolve_index_dir(spec: str, revision: Optional[str] = None) -> Path:
    """A local index directory for ``--index``: the folder itself, or a Hub dataset repo snapshot.

    Raises:
        FileNotFoundError: a local path that does not exist.
        OSError: the Hub repo cannot be downloaded (network, unknown repo, offline and not cached);
            the message says which and how to fix it.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    if not is_hub_id(spec):
        raise FileNotFoundError(f"index directory not found: {spec}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=spec, repo_type="dataset", revision=revision))
    except Exception as err:  # noqa: BLE001 - any Hub/network error becomes one clear message
        raise OSError(
            f"could not get the index {spec!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Give a local index directory, or check the repo id and the network (HF_HUB_OFFLINE)."
        ) from err


def source_kind(source: str) -> str:
    """``"imagefolder"``, ``"parquet"`` or ``"hub"`` for a ``--dataset`` argument.

    Raises:
        FileNotFoundError: ``source`` looks like a local path (starts with ``/``, ``.``, ``~``, or
            names a ``.parquet`` file) but does not exist.
        ValueError: a local folder holds neither images nor parquet files.
    """
    path = Path(os.path.expanduser(source))
    if path.is_file():
        if path.suffix.lower() == ".parquet":
            return "parquet"
        raise ValueError(f"{source} is a file but not a .parquet file; give an image folder, parquet or Hub id")
    if path.is_dir():
        has_images = has_parquet = False
        for _, _, files in os.walk(path):
            for name in files:
                suffix = os.path.splitext(name)[1].lower()
                has_images |= suffix in IMAGE_EXTENSIONS
                has_parquet |= suffix == ".parquet"
            if has_images:
                break
        if has_images:
            return "imagefolder"
        if has_parquet:
            return "parquet"
        raise ValueError(f"{source} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) and no .parquet files")
    if not is_hub_id(source):
        raise FileNotFoundError(f"dataset path not found: {source}")
    return "hub"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError as err:
        raise ValueError(f"shard must look like 'i/n' (e.g. 0/4), got {text!r}") from err
    check_shard((index, count))
    return index, count


def check_shard(shard: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless ``shard`` is ``(index, count)`` with ``0 <= index < count``."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard (index, count) needs 0 <= index < count, got {shard}")
