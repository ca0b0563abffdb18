"""Uploaded files -> checked 8-bit RGB images: decoding limits, and images or zips of images.

Every limit gives a plain :class:`InputError` naming the file and what was wrong, so that a
caller (the app, a script) can show it and carry on: non-image files, empty, truncated or
corrupt images, decompression bombs, files over :data:`MAX_UPLOAD_BYTES`, images under
:data:`~index_build.query.MIN_SIDE` px on a side, zips with too many or too large members.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from index_build.query import MIN_SIDE, cut_tiles

MAX_PIXELS = 40_000_000  # decoded pixels per image (about 6300 x 6300): decompression-bomb guard
MAX_UPLOAD_BYTES = 100 * 2**20  # per file
MAX_ZIP_MEMBERS = 2000
MAX_ZIP_BYTES = 500 * 2**20  # total uncompressed size of one zip
MAX_ADD_PATCHES = 500  # patches added to a gallery in one go (after tiling)
MAX_LISTED_ERRORS = 5  # unreadable files named in one message; the rest are counted
COLOUR_SPREAD = 8  # on 0-255: a pixel whose channels differ by more than this has colour
MIN_COLOUR_SHARE = 0.01  # an image with colour in fewer pixels than this is treated as grayscale
BROWSER_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP"})  # formats every browser shows
LABEL_PATTERN = re.compile(r"^[\w][\w .,()+\-]{0,63}$")

__all__ = [
    "MAX_ADD_PATCHES",
    "MAX_LISTED_ERRORS",
    "MAX_PIXELS",
    "MAX_UPLOAD_BYTES",
    "MAX_ZIP_BYTES",
    "MAX_ZIP_MEMBERS",
    "InputError",
    "UploadBatch",
    "colour_warning",
    "configure_pillow",
    "decode_image",
    "preview_png",
    "file_path",
    "image_hash",
    "iter_upload",
    "list_errors",
    "upload_batch",
]


class InputError(ValueError):
    """A user input that cannot be used; the message is meant to be shown as is."""


def check_label(label: Optional[str], reserved: Sequence[str] = ()) -> str:
    """A label for added patches, stripped; :class:`InputError` unless it has 1-64 characters of letters,
    digits, space and ``. , ( ) + - _`` (starting with a letter or digit) and is none of ``reserved``."""
    label = (label or "").strip()
    if not LABEL_PATTERN.match(label) or label in reserved:
        raise InputError(
            "give a label of 1-64 characters (letters, digits, space and . , ( ) + - _), e.g. 'my_case_12'"
        )
    return label


def configure_pillow() -> None:
    """Pillow's own decompression-bomb limit for this process (warning above, error above twice)."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def decode_image(source: Union[str, os.PathLike, IO[bytes]], name: Optional[str] = None) -> Image.Image:
    """Open an uploaded file safely and return it as an 8-bit RGB PIL image.

    Accepts anything Pillow reads (PNG, JPEG, TIFF incl. 16-bit and multi-page, BMP, WebP, ...);
    grayscale, RGBA (composited on white) and 16-bit data are converted like the model's processor.

    Args:
        source: a file path or a binary file object.
        name: how to call the file in messages (default: the path).

    Raises:
        InputError: not an image, corrupt or truncated, too many pixels, too small or too large a file.
    """
    from image_processing_lgffem import to_rgb_uint8

    label = name or (os.path.basename(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else "image")
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise InputError(f"{label}: file not found")
        size = os.path.getsize(source)
        if size == 0:
            raise InputError(f"{label}: the file is empty")
        if size > MAX_UPLOAD_BYTES:
            raise InputError(f"{label}: file of {size / 2**20:.0f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise InputError(_too_many_pixels(label, width * height, (width, height)))
                image.load()
                # phones store the pixels sideways with an EXIF Orientation tag: search what the browser shows
                upright = ImageOps.exif_transpose(image)
                rgb = to_rgb_uint8(upright)
                rgb = rgb.copy() if rgb is image else rgb
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow refused before the size could be read: its message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise InputError(_too_many_pixels(label, int(found.group(1)) if found else None)) from err
    except UnidentifiedImageError as err:
        raise InputError(f"{label}: not an image file (format not recognised); upload PNG, JPEG or TIFF") from err
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as err:
        raise InputError(f"{label}: corrupt or truncated image ({err})") from err
    if min(rgb.size) < MIN_SIDE:
        raise InputError(
            f"{label}: image too small ({rgb.width}×{rgb.height} px); at least {MIN_SIDE} px on each side is needed"
        )
    return rgb


def _too_many_pixels(label: str, pixels: Optional[int], dims: Optional[tuple[int, int]] = None) -> str:
    """The one sentence for an image over :data:`MAX_PIXELS` (``pixels``, ``dims``: its size, when known)."""
    size = f"has {pixels / 1e6:.1f} megapixels, more than" if pixels else "has more than"
    if dims:
        size = f"({dims[0]}×{dims[1]} px) {size}"
    return (
        f"{label}: the image {size} the {MAX_PIXELS / 1e6:.0f}-megapixel limit of this app; "
        "crop or downscale the region of interest first."
    )


def colour_warning(image: Image.Image) -> Optional[str]:
    """A warning when an RGB image has no colour (grayscale, e.g. a 16-bit grayscale TIFF, or RGB with
    equal channels): fewer than :data:`MIN_COLOUR_SHARE` of its pixels have channels more than
    :data:`COLOUR_SPREAD` apart. ``None`` for a colour image."""
    array = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = array.max(axis=2) - array.min(axis=2)
    if (spread > COLOUR_SPREAD).mean() >= MIN_COLOUR_SHARE:
        return None
    return (
        "This image has no colour (grayscale). H&E is a colour stain and the gallery holds colour images, "
        "so the results and any suggestion are unreliable: search a colour scan instead."
    )


def preview_png(path: str, folder: Optional[str] = None) -> Optional[str]:
    """A PNG copy of an uploaded image that browsers cannot show (TIFF, ...), for the page's preview.

    Returns the PNG's path (written in ``folder``), or ``None`` when the browser shows the file as is
    or it cannot be decoded (the search then reports why). The PNG holds the same 8-bit RGB pixels
    the search uses (:func:`decode_image`), so searching it gives the same results.
    """
    try:
        with Image.open(path) as image:
            if image.format in BROWSER_FORMATS:
                return None
        rgb = decode_image(path)
    except (InputError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    handle, out = tempfile.mkstemp(suffix=".png", prefix="preview-", dir=folder)
    with os.fdopen(handle, "wb") as stream:
        rgb.save(stream, format="PNG", compress_level=1)
    return out


def file_path(item: Any) -> str:
    """A path from what Gradio or a caller passes for a file (str, Path, or object with ``.name``/``.path``)."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    for attr in ("path", "name"):
        value = getattr(item, attr, None)
        if isinstance(value, str):
            return value
    raise InputError(f"unexpected upload object {type(item).__name__}")


def member_name(filename: str) -> str:
    """A zip entry's file name without its directories (``../../evil.png`` -> ``evil.png``; ``/`` and ``\\``)."""
    return re.split(r"[\\/]", filename)[-1]


def iter_upload(path: str) -> Iterator[tuple[str, Union[Image.Image, InputError]]]:
    """Yield ``(name, image or InputError)`` for one uploaded file: an image, or every image in a zip.

    A zip entry is named by its file name alone, without the directories it claims
    (``../../evil.png`` -> ``evil.png``); messages about it say ``<zip>/<file name>``.
    """
    name = os.path.basename(path)
    if not zipfile.is_zipfile(path):
        try:
            yield name, decode_image(path)
        except InputError as err:
            yield name, err
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            members = [
                m
                for m in members
                if not m.filename.startswith("__MACOSX/")
                and not member_name(m.filename).startswith(".")
                and member_name(m.filename)
            ]
            if len(members) > MAX_ZIP_MEMBERS:
                yield name, InputError(f"{name}: {len(members)} files; at most {MAX_ZIP_MEMBERS} per zip")
                return
            if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
                yield name, InputError(f"{name}: more than {MAX_ZIP_BYTES // 2**20} MB uncompressed")
                return
            for member in members:
                short = member_name(member.filename)
                shown = f"{name}/{short}"
                if member.file_size > MAX_UPLOAD_BYTES:
                    yield short, InputError(f"{shown}: larger than {MAX_UPLOAD_BYTES // 2**20} MB")
                    continue
                try:
                    data = archive.read(member)
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                    yield short, InputError(f"{shown}: cannot be read from the zip ({err})")
                    continue
                try:
                    yield short, decode_image(io.BytesIO(data), name=shown)
                except InputError as err:
                    yield short, err
    except (zipfile.BadZipFile, OSError) as err:
        yield name, InputError(f"{name}: corrupt zip file ({err})")


def list_errors(messages: Sequence[str], shown: int = MAX_LISTED_ERRORS) -> str:
    """A Markdown list, one line per message (``name: reason``), the first ``shown`` of them, then
    a line counting the rest (a bad zip may hold thousands of unreadable files)."""
    lines = [f"- {escape_markdown(message)}" for message in messages[:shown]]
    if len(messages) > shown:
        lines.append(f"- … and {len(messages) - shown} more ({len(messages)} files skipped in all)")
    return "\n".join(lines)


def escape_markdown(text: str) -> str:
    """``text`` shown literally in Markdown (file names may hold ``*``, ``_``, ``<``, ...)."""
    return re.sub(r"([\\`*\[\]<>|~])", r"\\\1", text)


def image_hash(image: Image.Image) -> str:
    """SHA-256 (hex) of a decoded image: its size, mode and pixels.

    The pixels, not the file bytes: the same image saved again (PNG or TIFF, other metadata or
    compression, inside a zip or not) is the same patch to the model and is a duplicate.
    """
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class UploadBatch:
    """Uploaded files turned into gallery patches (see :func:`upload_batch`)."""

    patches: list[Image.Image] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    """:func:`image_hash` of the image each patch was cut from (its tiles share it)."""
    skipped: list[str] = field(default_factory=list)
    """One message (``name: reason``) per unreadable file."""
    repeated: list[tuple[str, str]] = field(default_factory=list)
    """``(name, name of the earlier file)`` per file whose image came earlier in the same batch."""
    files: int = 0
    """Images read (not counting skipped ones and repeats)."""


def upload_batch(paths: Sequence[str], size: int, max_patches: int = MAX_ADD_PATCHES) -> UploadBatch:
    """Uploaded files (images or zips) -> gallery patches, tiled like queries, each image once.

    Large images are cut by :func:`index_build.query.cut_tiles`; each patch's source is
    ``upload:<name>`` (``#tile<n>`` for a tile). An image whose decoded pixels equal an earlier
    one of the batch is left out and listed in ``repeated``.

    Args:
        paths: the uploaded files.
        size: the model input in pixels.
        max_patches: the most patches accepted in one go.

    Raises:
        InputError: more than ``max_patches`` patches.
    """
    batch = UploadBatch()
    first: dict[str, str] = {}
    for path in paths:
        for name, loaded in iter_upload(path):
            if isinstance(loaded, InputError):
                batch.skipped.append(str(loaded))
                continue
            digest = image_hash(loaded)
            if digest in first:
                batch.repeated.append((name, first[digest]))
                continue
            first[digest] = name
            batch.files += 1
            _, tiles, crops = cut_tiles(loaded, size)
            for tile, crop in zip(tiles, crops):
                batch.patches.append(crop)
                batch.sources.append(f"upload:{name}" + (f"#tile{tile.number}" if len(tiles) > 1 else ""))
                batch.hashes.append(digest)
            if len(batch.patches) > max_patches:
                raise InputError(
                    f"more than {max_patches} patches in one go (large images count one per tile); "
                    "add them in smaller batches"
                )
    return batch
