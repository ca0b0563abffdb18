"""``python -m index_build``: embed an image collection into a searchable index directory.

Examples::

    python -m index_build path/to/Kimia_Path24C/train --out indexes/kimia24c        # folder s0..s23
    python -m index_build RationAI/PanNuke --split fold1 --label-column tissue --out indexes/pannuke
    python -m index_build more_patches/ --out indexes/kimia24c --append             # add images
    python -m index_build slides/ --out indexes/slides --mpp 0.5                     # slides/<label>/*.svs
    python -m index_build scans/ --slides --labels labels.csv --mpp-source 0.25 --out indexes/scans
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from index_build.faiss_index import INDEX_TYPES, check_index_type
from index_build.slide_index import is_slide_folder
from index_build.slides import DEFAULT_MAX_PIXELS, DEFAULT_MPP
from index_build.sources import (
    check_source,
    env_model_revision,
    is_default_model,
    parse_shard,
    public_dataset_source,
    source_kind,
)
from index_build.storage import DEFAULT_CHUNK_SIZE, WORK_DIR, has_index, recorded_model_revision
from index_build.tissue import MIN_TISSUE_FRACTION

if TYPE_CHECKING:
    from index_build.patch_index import PatchIndex

logger = logging.getLogger(__name__)


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"index parameters look like KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            continue
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m index_build",
        description="Embed images (image folder, parquet or Hub dataset) into a FAISS index with metadata.",
    )
    parser.add_argument(
        "source",
        help="image folder (class_name/*.png|jpg|tif), .parquet file/folder, Hub id, or a folder of whole slides",
    )
    parser.add_argument("--out", required=True, help="output index directory")
    parser.add_argument("--split", default=None, help="dataset split (needed when there are several)")
    parser.add_argument("--image-column", default=None, help="column holding the images (default 'image')")
    parser.add_argument("--label-column", default=None, help="column holding the class (default 'label')")
    parser.add_argument("--revision", default=None, help="Hub revision of the dataset")
    parser.add_argument("--model", default="default", help="model: 'default' (offline), a local folder or a Hub id")
    parser.add_argument(
        "--model-revision",
        default=env_model_revision(),
        help="branch, tag or commit of a Hub model; its code runs here, so pin a commit (env LGFFEM_MODEL_REVISION)",
    )
    parser.add_argument(
        "--index-type",
        default="flat",
        help=f"one of {', '.join(INDEX_TYPES)} (flat = exact cosine) or factory:<faiss index_factory string>",
    )
    parser.add_argument(
        "--index-param",
        action="append",
        type=_parse_param,
        default=[],
        metavar="KEY=VALUE",
        help="index parameter, repeatable (ivfpq: nlist, m, nbits, nprobe, train_size; hnsw: M, ef_construction, "
        "ef_search)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: cores - 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    parser.add_argument("--append", action="store_true", help="add the images to the existing index in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    parser.add_argument("--no-resume", action="store_true", help="discard a partial build instead of resuming it")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="rows per resumable chunk")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first unreadable image (default: skip it, log it and list it in the manifest)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="embed only the I-th of N contiguous shards (0-based), for a multi-machine build; merge the shard "
        "indexes with python -m index_build.shard merge",
    )
    slides = parser.add_argument_group(
        "whole slides",
        "A folder holding .svs/.ndpi/.mrxs/... files or pyramidal TIFFs is read as slides (any format OpenSlide "
        "reads, and large PNG/JPEG/TIFF with --slides): only tissue tiles are indexed, at --mpp µm/px.",
    )
    parser.add_argument(
        "--metadata",
        default=None,
        metavar="CSV",
        help="CSV of per-row metadata (organ, case, stain, ...) keyed by a 'slide' (slide builds) or 'file' column",
    )
    slides.add_argument("--slides", action="store_true", help="read SOURCE as a folder of slides / large images")
    slides.add_argument("--mpp", type=float, default=DEFAULT_MPP, help="µm per pixel of the tiles (default 0.5)")
    slides.add_argument("--tile-size", type=int, default=None, help="tile side in pixels (default: the model input)")
    slides.add_argument(
        "--mpp-source", type=float, default=None, help="µm/px at level 0 of slides that record none (e.g. 0.25 at 40x)"
    )
    slides.add_argument(
        "--labels", default=None, metavar="CSV", help="CSV with columns slide,label (default: the sub-folder name)"
    )
    slides.add_argument(
        "--min-tissue",
        type=float,
        default=MIN_TISSUE_FRACTION,
        help=f"least tissue share of an indexed tile (default {MIN_TISSUE_FRACTION})",
    )
    slides.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest plain (non-pyramidal) image read whole, in pixels (default {DEFAULT_MAX_PIXELS:,})",
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[tuple[int, int]]:
    """Reject bad arguments with ``parser.error`` (exit status 2) before anything is loaded; returns the shard."""
    args.slides = args.slides or is_slide_folder(args.source)
    try:
        if args.slides:
            if not Path(os.path.expanduser(args.source)).is_dir():
                raise FileNotFoundError(f"slides folder not found: {args.source}")
        else:
            source_kind(args.source)
        if not is_default_model(args.model):
            check_source(args.model, "model directory")
        check_index_type(args.index_type)
        shard = parse_shard(args.shard) if args.shard is not None else None
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.append and args.overwrite:
        parser.error("--append and --overwrite exclude each other")
    if args.append and not has_index(args.out):
        parser.error(f"--append: no index in {args.out}")
    interrupted = (Path(args.out) / WORK_DIR / "state.json").is_file()  # maybe killed after writing the index
    if not (args.append or args.overwrite) and has_index(args.out) and not interrupted:
        parser.error(f"an index already exists in {args.out}; pass --append or --overwrite")
    if args.metadata is not None and not Path(args.metadata).is_file():
        parser.error(f"--metadata: no such file {args.metadata}")
    if args.batch_size < 1 or args.chunk_size < 1:
        parser.error("--batch-size and --chunk-size must be at least 1")
    if args.slides:
        if shard is not None:
            parser.error("--shard is not supported for slides; index the slides in separate folders instead")
        if args.mpp <= 0 or (args.mpp_source is not None and args.mpp_source <= 0):
            parser.error("--mpp and --mpp-source must be positive (µm per pixel)")
        if args.tile_size is not None and args.tile_size < 16:
            parser.error("--tile-size must be at least 16")
        if not 0 <= args.min_tissue <= 1:
            parser.error("--min-tissue is a share between 0 and 1")
        if args.labels is not None and not Path(args.labels).is_file():
            parser.error(f"--labels: no such file {args.labels}")
    elif args.labels is not None or args.mpp_source is not None:
        parser.error("--labels and --mpp-source are for slides (a folder of slides, or --slides)")
    return shard


def main(argv: Optional[Sequence[str]] = None) -> PatchIndex:
    """CLI entry point; returns the written index."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shard = check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from index_build.data import load_image_dataset
    from index_build.models import load_model

    revision = args.model_revision
    if revision is None and args.append and not is_default_model(args.model):
        revision = recorded_model_revision(args.out, args.model)  # the commit the index was built with
    embedder = load_model(args.model, device=args.device, revision=revision)
    if args.slides:
        return _build_slides(args, embedder)
    dataset = load_image_dataset(
        args.source,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        revision=args.revision,
        shard=shard,
    )
    info = {
        "source": public_dataset_source(args.source),
        "split": args.split,
        "image_column": args.image_column or "image",
        "label_column": args.label_column or "label",
        "revision": args.revision,
        "rows": len(dataset),
    }
    if shard is not None:
        info["shard"] = list(shard)
    index = _build(args, embedder, dataset, info)
    logger.info("index %s: %d vectors, %d labels (%s)", args.out, len(index), len(index.labels), index.index_type)
    return index


def _build(args: argparse.Namespace, embedder, dataset, info: dict, extra_files: Optional[dict] = None) -> PatchIndex:
    """:func:`~index_build.embedding.build_index` with the command line's build options."""
    from index_build.embedding import build_index
    from index_build.metadata import add_metadata

    if args.metadata is not None:
        try:
            dataset = add_metadata(dataset, args.metadata, "slide" if args.slides else "file")
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        info["metadata"] = str(args.metadata)
    return build_index(
        dataset,
        args.out,
        embedder,
        index_type=args.index_type,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        resume=not args.no_resume,
        progress=not args.no_progress,
        append=args.append,
        overwrite=args.overwrite,
        index_params=dict(args.index_param) or None,
        chunk_size=args.chunk_size,
        dataset_info=info,
        strict=args.strict,
        extra_files=extra_files,
    )


def _build_slides(args: argparse.Namespace, embedder) -> PatchIndex:
    from index_build.slide_index import load_slide_dataset
    from index_build.slides import SLIDES_FILE, SlideError

    tile_size = args.tile_size or int(getattr(embedder.processor, "image_size", 224))
    try:
        dataset, slide_set = load_slide_dataset(
            args.source,
            mpp=args.mpp,
            tile_size=tile_size,
            min_tissue=args.min_tissue,
            labels_csv=args.labels,
            mpp_source=args.mpp_source,
            max_pixels=args.max_pixels,
            out_dir=args.out,
            strict=args.strict,
            progress=not args.no_progress,
        )
    except (SlideError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    info = {
        "source": public_dataset_source(args.source),
        "kind": "slides",
        "mpp": args.mpp,
        "tile_size": tile_size,
        "min_tissue": args.min_tissue,
        "labels": args.labels or "sub-folder names",
        "slides": len(slide_set.slides),
        "rows": len(dataset),
    }
    if slide_set.skipped:
        info["skipped_slides"] = slide_set.skipped
    index = _build(args, embedder, dataset, info, {SLIDES_FILE: slide_set.catalog_writer(args.out, append=args.append)})
    logger.info(
        "slide index %s: %d tiles of %d slides, %d labels",
        args.out,
        len(index),
        len(slide_set.slides),
        len(index.labels),
    )
    return index


def cli() -> int:
    """Console-script entry point: run :func:`main` on ``sys.argv`` and return the exit status."""
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
