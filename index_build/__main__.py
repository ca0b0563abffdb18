"""``python -m index_build``: embed an image collection into a searchable index directory.

Examples::

    python -m index_build path/to/Kimia_Path24C/train --out indexes/kimia24c        # folder s0..s23
    python -m index_build RationAI/PanNuke --split fold1 --label-column tissue --out indexes/pannuke
    python -m index_build more_patches/ --out indexes/kimia24c --append             # add images
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
from index_build.sources import check_source, parse_shard, source_kind
from index_build.storage import DEFAULT_CHUNK_SIZE, WORK_DIR, has_index, recorded_model_revision

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
    parser.add_argument("source", help="image folder (class_name/*.png|jpg|tif), .parquet file/folder or Hub id")
    parser.add_argument("--out", required=True, help="output index directory")
    parser.add_argument("--split", default=None, help="dataset split (needed when there are several)")
    parser.add_argument("--image-column", default=None, help="column holding the images (default 'image')")
    parser.add_argument("--label-column", default=None, help="column holding the class (default 'label')")
    parser.add_argument("--revision", default=None, help="Hub revision of the dataset")
    parser.add_argument("--model", default="default", help="model: 'default' (offline), a local folder or a Hub id")
    parser.add_argument(
        "--model-revision",
        default=os.environ.get("LGFFEM_MODEL_REVISION") or None,
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
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[tuple[int, int]]:
    """Reject bad arguments with ``parser.error`` (exit status 2) before anything is loaded; returns the shard."""
    try:
        source_kind(args.source)
        if args.model not in (None, "", "default"):
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
    if args.batch_size < 1 or args.chunk_size < 1:
        parser.error("--batch-size and --chunk-size must be at least 1")
    return shard


def main(argv: Optional[Sequence[str]] = None) -> PatchIndex:
    """CLI entry point; returns the written index."""
    parser = build_parser()
    args = parser.parse_args(argv)
    shard = check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from index_build.data import load_image_dataset
    from index_build.embedding import build_index
    from index_build.models import load_model

    revision = args.model_revision
    if revision is None and args.append and args.model not in (None, "", "default"):
        revision = recorded_model_revision(args.out, args.model)  # the commit the index was built with
    embedder = load_model(args.model, device=args.device, revision=revision)
    dataset = load_image_dataset(
        args.source,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        revision=args.revision,
        shard=shard,
    )
    info = {
        "source": args.source,
        "split": args.split,
        "image_column": args.image_column or "image",
        "label_column": args.label_column or "label",
        "revision": args.revision,
        "rows": len(dataset),
    }
    if shard is not None:
        info["shard"] = list(shard)
    index = build_index(
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
    )
    logger.info("index %s: %d vectors, %d labels (%s)", args.out, len(index), len(index.labels), index.index_type)
    return index


def cli() -> int:
    """Console-script entry point: run :func:`main` on ``sys.argv`` and return the exit status."""
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
