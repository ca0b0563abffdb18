"""``python -m index_build``: embed an image collection into a searchable index directory.

Examples::

    python -m index_build path/to/Kimia_Path24C/train --out indexes/kimia24c        # folder s0..s23
    python -m index_build RationAI/PanNuke --split fold1 --label-column tissue --out indexes/pannuke
    python -m index_build more_patches/ --out indexes/kimia24c --append             # add images
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional, Sequence

from index_build.data import load_image_dataset, parse_shard
from index_build.index import DEFAULT_CHUNK_SIZE, INDEX_TYPES, PatchIndex, build_index

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
    parser.add_argument("--model-revision", default=None, help="Hub revision of the model")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="embed only the I-th of N contiguous shards (0-based), for a multi-machine build; merge the shard "
        "indexes with python -m index_build.shard merge",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> PatchIndex:
    """CLI entry point; returns the written index."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from index_build.models import load_model

    try:
        shard = parse_shard(args.shard) if args.shard is not None else None
    except ValueError as err:
        build_parser().error(str(err))
    embedder = load_model(args.model, device=args.device, revision=args.model_revision)
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
    )
    logger.info("index %s: %d vectors, %d labels (%s)", args.out, len(index), len(index.labels), index.index_type)
    return index


if __name__ == "__main__":
    main(sys.argv[1:])
