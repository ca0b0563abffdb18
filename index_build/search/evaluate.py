"""The retrieval evaluation of the paper: query a gallery, report Recall@k, mMV@k, mAP@k and Kimia's eta.

Run ``python -m index_build.evaluate --model M --gallery G --queries Q`` (or ``--leave-one-out``
instead of ``--queries``). ``G`` / ``Q`` are image folders, parquet files or Hub ids (see
:func:`index_build.data.load_image_dataset`); ``G`` may also be an index directory built by
``python -m index_build`` with the same model. ``--baseline gap|gem`` evaluates the bare
backbone's pooled last-stage features instead of LGFFEM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from index_build.embedding import embed_batches
from index_build.metrics import kimia_eta, majority_vote_at_k, map_at_k, per_class_mean, recall_at_k, relevance_matrix
from index_build.patch_index import PatchIndex
from index_build.search_core import Query, VectorGallery, run_query
from index_build.sources import check_source, env_model_revision, is_default_model
from index_build.storage import has_index
from index_build.verdict import VERDICT_K, Verdict, decide

logger = logging.getLogger(__name__)

BASELINES = ("gap", "gem")
BASELINE_GEM_P = 3.0

__all__ = ["BASELINES", "BackboneEmbedder", "embed_rows", "evaluate", "format_table", "main", "verdict_metrics"]


class BackboneEmbedder:
    """Single-scale baseline: the model's frozen backbone, last stage pooled, L2-normalised.

    Same backbone weights and preprocessing as the wrapped LGFFEM embedder, without the neck
    and head. ``pooling="gap"`` is global average pooling; ``"gem"`` is GeM with a fixed
    ``p = 3`` (Radenović et al.'s usual value), so neither has trained parameters.
    """

    def __init__(self, embedder: Any, pooling: str = "gap", gem_p: float = BASELINE_GEM_P) -> None:
        if pooling not in BASELINES:
            raise ValueError(f"baseline pooling must be one of {BASELINES}, got {pooling!r}")
        self.embedder = embedder
        self.pooling = pooling
        self.gem_p = float(gem_p)
        self.backbone = embedder.model.backbone
        self.processor = embedder.processor
        self.device = embedder.device

    @property
    def dim(self) -> int:
        """Channels of the backbone's last feature stage."""
        return int(self.backbone.feature_info.channels()[-1])

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Preprocessed batch -> N x C float32 L2-normalised pooled last-stage features."""
        from functional_lgffem import gem

        x = self.backbone(pixel_values.to(self.device, non_blocking=True))[-1].float()
        if self.pooling == "gap":
            pooled = x.mean(dim=(-2, -1))
        else:
            pooled = gem(x, self.gem_p)
        return np.ascontiguousarray(F.normalize(pooled, dim=-1).cpu().numpy(), dtype=np.float32)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """The wrapped embedder's preprocessing (same processor, same tensors)."""
        return self.embedder.preprocess(images)

    def embed_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """Images -> N x C float32 L2-normalised embeddings."""
        from index_build.models import embed_in_batches

        return embed_in_batches(self, images, batch_size)

    def describe(self) -> dict:
        """Manifest entry: the base model with the baseline's pooling and its own hashes."""
        from index_build.models import state_fingerprint

        base = self.embedder.describe()
        tag = f"baseline-{self.pooling}" + (f"-p{self.gem_p:g}" if self.pooling == "gem" else "")
        return {
            "model": f"{base['model']}#{tag}",
            "revision": base.get("revision"),
            "config_hash": hashlib.sha256(f"{base['config_hash']}:{tag}".encode()).hexdigest()[:16],
            "weights_fingerprint": state_fingerprint(self.backbone),
            "embedding_dim": self.dim,
            "config": {"baseline": tag, **base.get("config", {})},
        }


def embed_rows(
    dataset, embedder: Any, batch_size: int = 32, num_workers: Optional[int] = None, progress: bool = True
) -> tuple[np.ndarray, list[str], float]:
    """Embed every row of a dataset (no thumbnails, nothing on disk).

    Returns:
        ``(xb, labels, seconds)``: embeddings, labels and the wall time of the whole pass
        (decoding, preprocessing and the forward passes).
    """
    chunks: list[np.ndarray] = []
    labels: list[str] = []
    start = time.perf_counter()
    for xb, batch_labels, _sources, _thumbs in embed_batches(
        dataset, embedder, batch_size, num_workers, thumbnail_size=0, progress=progress
    ):
        chunks.append(xb)
        labels.extend(batch_labels)
    return np.concatenate(chunks), labels, time.perf_counter() - start


def _exact_search(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(np.ascontiguousarray(xb, dtype=np.float32))
    return index.search(np.ascontiguousarray(xq, dtype=np.float32), k)


def _drop_self(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out: remove query ``i``'s own id from row ``i`` (else its last column)."""
    out_ids = np.empty((len(ids), k), dtype=np.int64)
    out_scores = np.empty((len(ids), k), dtype=np.float32)
    for i, (row_ids, row_scores) in enumerate(zip(ids, scores)):
        keep = np.flatnonzero(row_ids != i)[:k]
        out_ids[i], out_scores[i] = row_ids[keep], row_scores[keep]
    return out_ids, out_scores


def tiled_retrieval(
    queries,
    embedder: Any,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    gallery_labels: Sequence[Any],
    k: int,
    progress: bool = True,
) -> tuple[np.ndarray, list[str], float, int, list[list[int]]]:
    """Search every query as the app does, through the query core (:func:`index_build.search_core.run_query`):
    cut into tiles, skip the blank-glass tiles, search each tile, merge.

    Args:
        queries: a Dataset of (image, label) rows, images of any size.
        embedder: the model (``preprocess``, ``embed_pixels``; its processor's ``image_size`` is the tile size).
        search: ``(xq, k) -> (D, I)`` over the gallery.
        gallery_labels: the label of every gallery id.
        k: results per tile, and merged results per query (at most :data:`~index_build.search_core.MAX_K`).
        progress: show a progress bar.

    Returns:
        ``(retrieved, labels, seconds, tiles, ids)``: the merged ranked labels (``Nq x k``, ``None``
        where fewer than ``k`` distinct patches were found), the query labels, the wall time of
        the whole pass, the total number of tiles searched (blank-glass tiles left out) and the
        merged ranked gallery ids of every query.
    """
    retrieved, labels, seconds, tiles, ids, _verdicts = _tiled_pass(
        queries, embedder, search, gallery_labels, k, progress
    )
    return retrieved, labels, seconds, tiles, ids


def _tiled_pass(
    queries,
    embedder: Any,
    search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
    gallery_labels: Sequence[Any],
    k: int,
    progress: bool = True,
    decision: Optional[tuple[Optional[float], Optional[dict], Sequence[str]]] = None,
) -> tuple[np.ndarray, list[str], float, int, list[list[int]], list[Verdict]]:
    """:func:`tiled_retrieval`, plus the verdict of every query when ``decision`` = ``(threshold, rule,
    labels)`` is given (each tile searched for at least ``VERDICT_K`` hits; the ranking uses ``k``)."""
    from tqdm.auto import tqdm

    from image_processing_lgffem import to_rgb_uint8

    gallery = VectorGallery(search, gallery_labels)
    if decision is not None:  # the verdict's inputs: this gallery's threshold, fitted rule and labels
        gallery.close_match_threshold, gallery.decision_rule, gallery.labels = decision
    galleries = [("gallery", gallery)]
    retrieved, labels, ranked, tiles_searched, verdicts = [], [], [], 0, []
    start = time.perf_counter()
    for row in tqdm(range(len(queries)), unit="img", desc="tiled queries", disable=not progress):
        item = queries[row]
        found = run_query(Query.picture(to_rgb_uint8(item["image"])), galleries, k, embedder=embedder, thumbnails=False)
        if decision is not None:
            verdicts.append(found.verdict)
        retrieved.append([h.label for h in found.hits] + [None] * (k - len(found.hits)))
        ranked.append([h.id for h in found.hits])
        labels.append(item["label"])
        tiles_searched += len(found.searched)
    return (
        np.array(retrieved, dtype=object).reshape(len(labels), k),
        labels,
        time.perf_counter() - start,
        tiles_searched,
        ranked,
        verdicts,
    )


def verdict_metrics(query_labels: Sequence[Any], verdicts: Sequence[Verdict]) -> dict[str, Any]:
    """``verdict_coverage`` (share of queries given a suggestion), ``verdict_precision`` (share of the
    suggestions that are right; ``None`` without suggestions) and ``verdict_kinds`` (count per kind)."""
    suggested = [v.label == str(q) for q, v in zip(query_labels, verdicts) if v.kind == "suggestion"]
    kinds: dict[str, int] = {}
    for v in verdicts:
        kinds[v.kind] = kinds.get(v.kind, 0) + 1
    return {
        "verdict_coverage": len(suggested) / len(verdicts) if verdicts else 0.0,
        "verdict_precision": sum(suggested) / len(suggested) if suggested else None,
        "verdict_kinds": kinds,
    }


def gallery_decision_inputs(gallery: Any, xb: Optional[np.ndarray] = None, labels: Sequence[Any] = ()) -> tuple:
    """``(threshold, rule, labels)`` of a gallery: an index's own (manifest), or, for a dataset embedded
    here (``xb``), calibrated and fitted now as ``python -m index_build`` would."""
    from index_build.calibration import close_match_threshold
    from index_build.verdict import fit_decision, near_duplicate_groups

    if isinstance(gallery, PatchIndex):
        return gallery.close_match_threshold, gallery.decision_rule, gallery.labels
    calibration = close_match_threshold(xb)
    threshold = calibration["threshold"] if calibration else None
    sources = [str(s) for s in gallery.with_format(None)["source"]] if "source" in gallery.column_names else []
    groups, how = near_duplicate_groups(sources) if sources else ([str(i) for i in range(len(xb))], "row")
    names = [str(label) for label in labels]
    return threshold, fit_decision(xb, names, groups, threshold, groups_from=how), sorted(set(names))


def retrieval_metrics(query_labels: Sequence[Any], retrieved_labels: np.ndarray, k: int = 5) -> dict[str, Any]:
    """Recall@1, Recall@k, mMV@k, mAP@k, Kimia's eta and per-class Recall@1 from ranked labels."""
    hits1 = relevance_matrix(query_labels, retrieved_labels, 1)[:, 0]
    metrics: dict[str, Any] = {
        "recall@1": recall_at_k(query_labels, retrieved_labels, 1),
        f"recall@{k}": recall_at_k(query_labels, retrieved_labels, k),
        f"mmv@{k}": majority_vote_at_k(query_labels, retrieved_labels, k),
        f"map@{k}": map_at_k(query_labels, retrieved_labels, k),
    }
    metrics.update(kimia_eta(query_labels, retrieved_labels[:, 0]))
    metrics["per_class_recall@1"] = {str(c): v for c, v in per_class_mean(query_labels, hits1).items()}
    return metrics


def evaluate(
    embedder: Any,
    gallery: Any,
    queries: Any = None,
    k: int = 5,
    leave_one_out: bool = False,
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    progress: bool = True,
    tile: bool = False,
) -> dict[str, Any]:
    """Query a gallery and compute the paper's retrieval metrics (exact cosine search).

    Args:
        embedder: ``index_build.models.Embedder`` or :class:`BackboneEmbedder`.
        gallery: a Dataset from :func:`index_build.data.load_image_dataset`, or a loaded
            :class:`PatchIndex` (searched as built, e.g. approximate).
        queries: a Dataset of queries; ``None`` with ``leave_one_out``.
        k: depth of Recall@k, mMV@k and mAP@k (Recall@1 is always reported).
        leave_one_out: query the gallery with itself, excluding each query from its own results.
        batch_size: images per forward pass.
        num_workers: DataLoader workers.
        progress: show progress bars.
        tile: search each query the way the app does (:func:`tiled_retrieval`): large queries
            (e.g. Kimia Path24C's 1000 x 1000 test patches) are cut into tiles of the model input,
            each tile is searched and the results are merged; the ranked list is the merged one.

    Returns:
        ``{"recall@1", "recall@k", "mmv@k", "map@k", "eta_p", "eta_w", "eta_total",
        "queries_per_s", "n_gallery", "n_queries", "per_class_recall@1", "k", "leave_one_out"}``.
        ``queries_per_s`` = queries / (time to read + embed them + time to search); in
        leave-one-out mode the gallery pass is the query pass, and with a :class:`PatchIndex`
        gallery in leave-one-out mode the stored vectors are the queries (search time only).
    """
    if (queries is None) == (not leave_one_out):
        raise ValueError("give queries, or leave_one_out=True without queries (not both)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if tile and leave_one_out:
        raise ValueError("tile needs queries: tiled search is for query images, not leave-one-out")
    if tile:
        return _evaluate_tiled(embedder, gallery, queries, k, batch_size, num_workers, progress)
    depth = max(k, VERDICT_K) + 1 if leave_one_out else max(k, VERDICT_K)
    if isinstance(gallery, PatchIndex):
        gallery_labels = gallery.row_labels
        if leave_one_out:
            xq, query_labels, embed_seconds = gallery.reconstruct_all(), gallery_labels, 0.0
        else:
            xq, query_labels, embed_seconds = embed_rows(queries, embedder, batch_size, num_workers, progress)
        start = time.perf_counter()
        scores, ids = gallery.search_embeddings(xq, min(depth, len(gallery)))
        search_seconds = time.perf_counter() - start
        n_gallery = len(gallery)
        decision = gallery_decision_inputs(gallery)
    else:
        xb, gallery_labels, gallery_seconds = embed_rows(gallery, embedder, batch_size, num_workers, progress)
        if leave_one_out:
            xq, query_labels, embed_seconds = xb, gallery_labels, gallery_seconds
        else:
            xq, query_labels, embed_seconds = embed_rows(queries, embedder, batch_size, num_workers, progress)
        start = time.perf_counter()
        scores, ids = _exact_search(xb, xq, min(depth, len(xb)))
        search_seconds = time.perf_counter() - start
        n_gallery = len(xb)
        decision = gallery_decision_inputs(gallery, xb, gallery_labels)
    if leave_one_out:
        ids, scores = _drop_self(ids, scores, min(depth - 1, ids.shape[1] - 1))
    if ids.shape[1] < k:
        raise ValueError(f"the gallery has too few images ({n_gallery}) for k={k}")
    labels = np.asarray(gallery_labels, dtype=object)
    found = np.where(ids >= 0, labels[np.clip(ids, 0, None)], None)
    metrics = retrieval_metrics(query_labels, found[:, :k], k)
    threshold, rule, scope = decision
    verdicts = [
        decide(
            [[(str(lab), float(sc)) for lab, sc, i in zip(row_labels, row_scores, row_ids) if i >= 0]],
            threshold,
            rule,
            scope,
        )
        for row_labels, row_scores, row_ids in zip(found, scores, ids)
    ]
    metrics.update(verdict_metrics(query_labels, verdicts))
    metrics.update(
        queries_per_s=len(query_labels) / max(embed_seconds + search_seconds, 1e-9),
        n_gallery=int(n_gallery),
        n_queries=len(query_labels),
        k=k,
        leave_one_out=leave_one_out,
    )
    return metrics


def _evaluate_tiled(
    embedder: Any, gallery: Any, queries: Any, k: int, batch_size: int, num_workers: Optional[int], progress: bool
) -> dict[str, Any]:
    if isinstance(gallery, PatchIndex):
        gallery_labels, n_gallery = gallery.row_labels, len(gallery)

        def search(xq: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
            return gallery.search_embeddings(xq, min(depth, n_gallery))

        decision = gallery_decision_inputs(gallery)
    else:
        xb, gallery_labels, _seconds = embed_rows(gallery, embedder, batch_size, num_workers, progress)
        n_gallery = len(xb)

        def search(xq: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
            return _exact_search(xb, xq, min(depth, n_gallery))

        decision = gallery_decision_inputs(gallery, xb, gallery_labels)
    if n_gallery < k:
        raise ValueError(f"the gallery has too few images ({n_gallery}) for k={k}")
    retrieved, query_labels, seconds, tiles, _ids, verdicts = _tiled_pass(
        queries, embedder, search, gallery_labels, k, progress, decision
    )
    metrics = retrieval_metrics(query_labels, retrieved, k)
    metrics.update(verdict_metrics(query_labels, verdicts))
    metrics.update(
        queries_per_s=len(query_labels) / max(seconds, 1e-9),
        n_gallery=int(n_gallery),
        n_queries=len(query_labels),
        k=k,
        leave_one_out=False,
        tiles_per_query=tiles / max(1, len(query_labels)),
    )
    return metrics


def format_table(rows: Sequence[tuple[str, dict]], k: int = 5) -> str:
    """A Markdown table, one row per ``(name, metrics)``."""
    header = ["model", "n_gallery", "n_queries", "Recall@1", f"Recall@{k}", f"mMV@{k}", f"mAP@{k}"]
    header += ["η_p", "η_W", "η_total", "verdict coverage", "verdict precision", "queries/s"]
    keys = ["recall@1", f"recall@{k}", f"mmv@{k}", f"map@{k}", "eta_p", "eta_w", "eta_total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows:
        cells = [name, str(m["n_gallery"]), str(m["n_queries"])] + [f"{m[key]:.4f}" for key in keys]
        for key in ("verdict_coverage", "verdict_precision"):
            cells.append("-" if m.get(key) is None else f"{m[key]:.4f}")
        cells.append(f"{m['queries_per_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_per_class(name: str, metrics: dict) -> str:
    """A Markdown table of per-class Recall@1."""
    per_class = metrics["per_class_recall@1"]
    lines = [f"| {name}: class | Recall@1 |", "|---|---|"]
    lines += [f"| {label} | {value:.4f} |" for label, value in per_class.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m index_build.evaluate",
        description="Retrieval evaluation: Recall@1, Recall@k, mMV@k, mAP@k, Kimia eta, queries/s.",
    )
    parser.add_argument("--model", default="default", help="model: 'default', a local folder or a Hub id")
    parser.add_argument(
        "--model-revision",
        default=env_model_revision(),
        help="branch, tag or commit of a Hub model; its code runs here, so pin a commit (env LGFFEM_MODEL_REVISION)",
    )
    parser.add_argument("--gallery", required=True, help="gallery: image folder, parquet, Hub id or index directory")
    parser.add_argument("--queries", default=None, help="queries: image folder, parquet or Hub id")
    parser.add_argument("--leave-one-out", action="store_true", help="query the gallery with itself, minus the query")
    parser.add_argument("--split", default=None, help="split of the gallery (and of the queries unless --query-split)")
    parser.add_argument("--query-split", default=None, help="split of the queries")
    parser.add_argument("--image-column", default=None, help="image column (default 'image')")
    parser.add_argument("--label-column", default=None, help="label column (default 'label')")
    parser.add_argument("--revision", default=None, help="Hub revision of the dataset(s)")
    parser.add_argument("--baseline", choices=BASELINES, default=None, help="evaluate the bare backbone, pooled")
    parser.add_argument("-k", "--k", type=int, default=5, help="depth of Recall@k, mMV@k, mAP@k (default 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: cores - 1)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument(
        "--tile",
        action="store_true",
        help="search large queries as the app does (the query core): tiles of the model input, blank glass "
        "skipped, searched and merged",
    )
    parser.add_argument("--per-class", action="store_true", help="also print per-class Recall@1")
    parser.add_argument("--json", dest="json_path", default=None, help="write the metrics as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point; returns the metrics."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.queries is None and not args.leave_one_out:
        parser.error("give --queries, or --leave-one-out")
    if args.queries is not None and args.leave_one_out:
        parser.error("--queries and --leave-one-out exclude each other")
    if args.tile and args.leave_one_out:
        parser.error("--tile needs --queries (tiled search is for query images)")
    if args.k < 1 or args.batch_size < 1:
        parser.error("-k and --batch-size must be at least 1")
    try:  # bad paths are argument errors, reported before the model is loaded
        check_source(args.gallery, "gallery path")
        if args.queries is not None:
            check_source(args.queries, "queries path")
        if not is_default_model(args.model):
            check_source(args.model, "model directory")
    except FileNotFoundError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from index_build.data import load_image_dataset
    from index_build.models import load_model

    embedder: Any = load_model(args.model, device=args.device, revision=args.model_revision)
    name = embedder.model_id
    if args.baseline:
        embedder = BackboneEmbedder(embedder, args.baseline)
        name = embedder.describe()["model"]
    columns = {"image_column": args.image_column, "label_column": args.label_column, "revision": args.revision}
    if has_index(args.gallery):
        gallery: Any = PatchIndex.load(args.gallery, embedder)
    else:
        gallery = load_image_dataset(args.gallery, split=args.split, **columns)
    queries = None
    if args.queries is not None:
        queries = load_image_dataset(args.queries, split=args.query_split or args.split, **columns)
    metrics = evaluate(
        embedder,
        gallery,
        queries,
        k=args.k,
        leave_one_out=args.leave_one_out,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        tile=args.tile,
    )
    metrics.update(model=name, gallery=args.gallery, queries=args.queries, baseline=args.baseline)
    print(format_table([(name, metrics)], k=args.k))
    if args.per_class:
        print()
        print(format_per_class(name, metrics))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info("wrote %s", args.json_path)
    return metrics


def cli() -> int:
    """Console-script entry point: run :func:`main` on ``sys.argv`` and return the exit status."""
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
