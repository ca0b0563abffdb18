"""Index builds beyond one machine: embed shards in parallel, then merge them into one index.

Two steps::

    # 1. on every machine / GPU, one contiguous shard of the dataset -> an exact (flat) shard index
    python -m index_build SOURCE --shard 0/4 --out shards/shard-0-of-4
    # or, with one process per GPU and the shard taken from the process rank:
    accelerate launch -m index_build.shard build SOURCE --out-root shards

    # 2. anywhere: concatenate the shards in order and write the final index of any type
    python -m index_build.shard merge shards/shard-*-of-4 --out indexes/collection --index-type ivfpq

Shards are contiguous slices of the dataset (``datasets.Dataset.shard(contiguous=True)``), so
concatenating their vectors and metadata in shard order reproduces the row order of a
single-machine build, and the merge writes the final index with the same writer, training sample
and seed (:func:`index_build.index.write_index`): the merged index gives exactly the search
results of a single-machine build. Shards keep exact vectors (flat), so any final type can be
chosen at merge time, and an approximate index is trained once, on the whole collection.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import faiss
import numpy as np
import pyarrow as pa

from index_build.calibration import close_match_threshold_chunked
from index_build.faiss_index import (
    INDEX_TYPES,
    check_index_type,
    empty_faiss_index,
    set_search_params,
    training_rows,
)
from index_build.patch_index import PatchIndex, check_manifest_matches, write_built_index, write_index
from index_build.sources import check_source, is_default_model, parse_shard, source_kind
from index_build.storage import IndexLoadError, has_index, model_mismatches

logger = logging.getLogger(__name__)

SHARD_DIR = "shard-{index}-of-{count}"
IVFDATA_FILE = "index.ivfdata"  # the inverted lists of an on-disk merge, next to the index file
_SHARD_RE = re.compile(r"^shard-(\d+)-of-(\d+)$")
_EXACT_TYPES = ("flat",)

__all__ = ["load_shards", "merge_shards", "shard_dir_name", "main"]


def shard_dir_name(index: int, count: int) -> str:
    """Directory name of shard ``index`` of ``count`` (``shard-<i>-of-<n>``)."""
    return SHARD_DIR.format(index=index, count=count)


def _shard_of(index: PatchIndex) -> tuple[int, int]:
    shard = index.manifest.get("dataset", {}).get("shard")
    if shard is not None:
        return int(shard[0]), int(shard[1])
    match = _SHARD_RE.match(index.path.name)
    if match:
        return int(match.group(1)), int(match.group(2))
    raise IndexLoadError(f"{index.path} is not a shard index: its manifest records no dataset shard")


def load_shards(paths: Sequence[str | Path]) -> list[PatchIndex]:
    """Open shard indexes and check that they form one complete, consistent set.

    The shards must all be present (``0..n-1`` of the same ``n``, each once), exact (flat), and
    built with the same model (dimension, config hash, weights fingerprint); differing source
    paths only log a warning (machines may mount the same data at different paths).

    Returns:
        The shards in shard order.

    Raises:
        IndexLoadError: a shard is missing, repeated, corrupt, approximate, or inconsistent.
    """
    if not paths:
        raise ValueError("no shard directories given")
    shards = [PatchIndex.load(p) for p in paths]
    numbered = {}
    for shard in shards:
        i, n = _shard_of(shard)
        if shard.index_type not in _EXACT_TYPES:
            raise IndexLoadError(
                f"shard {shard.path} has index type {shard.index_type!r}; shards must be exact ('flat') so that "
                "the merge can re-add their vectors (build shards without --index-type)"
            )
        if (i, n) in numbered:
            raise IndexLoadError(f"shard {i}/{n} given twice: {numbered[(i, n)].path} and {shard.path}")
        numbered[(i, n)] = shard
    counts = {n for _, n in numbered}
    if len(counts) != 1:
        raise IndexLoadError(f"shards come from different shardings: counts {sorted(counts)}")
    count = counts.pop()
    missing = [i for i in range(count) if (i, count) not in numbered]
    if missing:
        raise IndexLoadError(f"missing shard(s) {missing} of {count}")
    ordered = [numbered[(i, count)] for i in range(count)]
    first = ordered[0]
    source = first.manifest.get("dataset", {}).get("source")
    for shard in ordered[1:]:
        problems = model_mismatches(shard.manifest["model"], first.manifest["model"])
        if problems:
            raise IndexLoadError(
                f"shard {shard.path} was built with another model than {first.path}: {'; '.join(problems)}"
            )
        other = shard.manifest.get("dataset", {}).get("source")
        if other != source:  # the same data may be mounted at different paths on different machines
            logger.warning("shard %s was built from %r, %s from %r", shard.path, other, first.path, source)
    return ordered


def merge_shards(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    embedder,
    index_type: str = "flat",
    index_params: Optional[dict] = None,
    on_disk: bool = False,
) -> PatchIndex:
    """Concatenate shard indexes (in shard order) into one index directory of any type.

    Args:
        paths: the shard directories (any order).
        out_dir: the merged index directory (must not hold an index yet).
        embedder: the model the shards were built with (recorded in the manifest, checked).
        index_type: final index type (see :func:`index_build.index.make_faiss_index`).
        index_params: overrides of the final index's parameters.
        on_disk: never hold more than one shard's vectors: an inverted-file index (``ivfpq`` or
            a ``factory:IVF...`` string) whose lists are written to ``index.ivfdata`` in
            ``out_dir`` (FAISS ``OnDiskInvertedLists``, memory-mapped when searched); the same
            training sample, codes and search results as the in-memory merge.
    """
    out = Path(out_dir)
    if has_index(out):
        raise ValueError(f"an index already exists in {out}; choose another --out")
    shards = load_shards(paths)
    for shard in shards:
        check_manifest_matches(shard.manifest, embedder, shard.path)
    metadata = pa.concat_tables([shard.metadata_table() for shard in shards], promote_options="default")
    info = dict(shards[0].manifest.get("dataset", {}))
    info.pop("shard", None)
    info.pop("data_hash", None)  # of the first shard's rows only
    info["rows"] = int(metadata.num_rows)
    info["merged_from"] = [str(shard.path) for shard in shards]
    skipped = [entry for shard in shards for entry in shard.manifest.get("skipped", [])]
    logger.info("merging %d shards, %d vectors, into a %s index at %s", len(shards), len(metadata), index_type, out)
    if on_disk:
        return _merge_on_disk(shards, out, embedder, index_type, index_params, metadata, info, skipped)
    xb = np.concatenate([shard.reconstruct_all() for shard in shards])
    return write_index(out, xb, metadata, embedder, index_type, index_params, info, skipped, normalized=True)


def _unit_vectors(shard: PatchIndex) -> np.ndarray:
    return shard.reconstruct_all()  # unit vectors: loading checks them (stored as they are, as the merge does)


def _merge_on_disk(shards, out: Path, embedder, index_type, index_params, metadata, info, skipped) -> PatchIndex:
    """:func:`merge_shards` with ``on_disk``: train on the sampled rows, add shard by shard, merge on disk."""
    from faiss.contrib.ondisk import merge_ondisk

    sizes = [len(shard) for shard in shards]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n, d = int(starts[-1]), shards[0].dim
    index, used = empty_faiss_index(n, d, index_type, index_params)
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError as err:
        raise ValueError(
            f"--on-disk needs an inverted-file index (ivfpq or factory:IVF...), not {index_type!r}"
        ) from err
    if not index.is_trained:
        rows = training_rows(n, used)
        if rows is None:
            sample = np.concatenate([_unit_vectors(shard) for shard in shards])  # n <= train_size: small
        else:
            sample = np.empty((len(rows), d), dtype=np.float32)
            for s, shard in enumerate(shards):
                mine = (rows >= starts[s]) & (rows < starts[s + 1])
                if mine.any():
                    sample[mine] = _unit_vectors(shard)[rows[mine] - starts[s]]
        logger.info("training %s index on %d of %d vectors", index_type, len(sample), n)
        index.train(sample)
        del sample
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".blocks-", dir=out) as blocks_dir:
        blocks = []
        for s, shard in enumerate(shards):
            block = faiss.clone_index(index)
            block.add_with_ids(_unit_vectors(shard), np.arange(starts[s], starts[s + 1], dtype=np.int64))
            blocks.append(str(Path(blocks_dir) / f"block-{s}.index"))
            faiss.write_index(block, blocks[-1])
            del block
        merge_ondisk(index, blocks, str(out / IVFDATA_FILE))
    set_search_params(index, used)
    close_match = close_match_threshold_chunked(sizes, [lambda shard=shard: _unit_vectors(shard) for shard in shards])
    return write_built_index(out, index, used, metadata, embedder, index_type, info, skipped, close_match)


def _rank_and_world() -> tuple[int, int, Optional[str]]:
    """(process index, process count, device) from ``accelerate`` (or torchrun's environment).

    Without CUDA the processes join a CPU process group (gloo): ``accelerate`` would otherwise
    treat every process started by ``accelerate launch --multi_gpu`` / torchrun on a CPU-only
    machine as a lone process 0 of 1, and they would all build shard 0 of 1.
    """
    try:
        import torch
        from accelerate import PartialState
    except ImportError:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        return rank, world, None
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, str(state.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m index_build.shard", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build",
        allow_abbrev=False,
        help="embed this process's shard (rank/world from accelerate, or --shard i/n) into OUT_ROOT/shard-i-of-n",
    )
    build.add_argument("source", help="image folder, .parquet file/folder or Hub id (as python -m index_build)")
    build.add_argument("--out-root", required=True, help="folder that receives one shard-i-of-n directory per shard")
    build.add_argument("--shard", default=None, help="i/n; default: this process's rank / number of processes")
    merge = sub.add_parser("merge", help="merge shard directories into one index", allow_abbrev=False)
    merge.add_argument("shards", nargs="+", help="shard directories (shard-i-of-n), all n of them")
    merge.add_argument("--out", required=True, help="merged index directory")
    merge.add_argument("--model", default="default", help="the model the shards were built with")
    merge.add_argument("--model-revision", default=None)
    merge.add_argument("--index-type", default="flat", help=f"{', '.join(INDEX_TYPES)} or factory:<string>")
    merge.add_argument("--index-param", action="append", default=[], metavar="KEY=VALUE")
    merge.add_argument(
        "--on-disk",
        action="store_true",
        help="hold one shard at a time and write the inverted lists to OUT/index.ivfdata (IVF types only); "
        "for collections larger than memory",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Optional[PatchIndex]:
    """CLI entry point. Unknown options of ``build`` are passed on to ``python -m index_build``."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:  # bad paths are argument errors, reported before a model is loaded
        if not is_default_model(getattr(args, "model", None)):
            check_source(args.model, "model directory")
        if args.command == "merge":
            missing = [path for path in args.shards if not Path(path).is_dir()]
            if missing:
                raise FileNotFoundError(f"shard directory not found: {', '.join(missing)}")
            check_index_type(args.index_type)
        else:
            source_kind(args.source)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.command == "merge":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if has_index(args.out):
            parser.error(f"an index already exists in {args.out}; choose another --out")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        from index_build.__main__ import _parse_param
        from index_build.models import load_model

        params = dict(_parse_param(p) for p in args.index_param) or None
        embedder = load_model(args.model, revision=args.model_revision)
        return merge_shards(args.shards, args.out, embedder, args.index_type, params, on_disk=args.on_disk)
    from index_build.__main__ import main as build_main

    if args.shard is not None:
        try:
            index, count = parse_shard(args.shard)
        except ValueError as err:
            parser.error(str(err))
        device = None
    else:
        index, count, device = _rank_and_world()
    if "--out" in rest or any(a.startswith("--out=") for a in rest):
        parser.error("build takes --out-root; each shard goes to OUT_ROOT/shard-i-of-n")
    argv = [
        args.source,
        "--shard",
        f"{index}/{count}",
        "--out",
        str(Path(args.out_root) / shard_dir_name(index, count)),
    ]
    if device is not None and "--device" not in rest:
        argv += ["--device", device]
    return build_main(argv + rest)


def cli() -> int:
    """Console-script entry point: run :func:`main` on ``sys.argv`` and return the exit status."""
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
