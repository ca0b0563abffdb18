"""Archive scale: ~10 M vectors streamed to disk in shards, a compressed on-disk FAISS index, exact re-rank.

Goal (issue 14): at N = 10,000,000 vectors of the default model's dimension (512) on one machine,
recall@10 >= 0.95 of exact search, single-query p50 <= 20 ms on one thread, index memory <= 1/8 of
the exact vectors, build peak RSS <= 8 GB; the full set of vectors is never held in memory.

How the vectors are drawn (:class:`ArchiveDistribution`)
---------------------------------------------------------
1. ``R`` = 601 real patches from ``../shared/data`` (200 random images of each of the LC25000 lung
   and colon galleries, the 41 CRC tiles, 160 random 224 px crops of the two slides) are embedded
   once with the default model and cached in ``/tmp`` (:func:`real_embeddings`; it runs in a
   child process so the model does not count in the build's peak RSS).
2. The *local spread* is fitted on them: for every real embedding, the difference to its nearest
   real neighbour; half the covariance of these differences is the covariance of one patch around
   a shared local centre. Its top ``rank`` principal directions keep their own variances, the rest
   is one isotropic variance (so the total variance is the fitted one).
3. An archive has many patches from the same tissue: ``n / patches_per_region`` *region centres*
   are drawn around uniformly chosen real embeddings with a fraction ``region_share`` of that
   variance, and every vector is drawn around a uniformly chosen region centre with the rest,
   then L2-normalised. Queries are drawn the same way (new draws, not in the collection).
4. The collection is stored as float16 shards (``shard-00000.f16``, ...); the stored float16
   values *are* the collection: the exact search and the re-rank read the same numbers.

The printed fit check compares the nearest-neighbour cosine of the real embeddings with that of
one synthetic vector drawn around each of them with the whole fitted spread.

The index
---------
``IVF<nlist>,PQ<m>`` (inner product, FAISS) trained on a sample of the first shard; every shard is
added to a copy of the empty trained index and written as a block; the blocks are merged with
``faiss.contrib.ondisk.merge_ondisk`` into one index whose inverted lists live in an ``.ivfdata``
file (``OnDiskInvertedLists``, memory-mapped). A search asks for ``k * refine`` candidates and
re-ranks them by their exact inner product, read from the float16 shards on disk (memory-mapped).

Exact ground truth is computed while streaming (a chunked brute force over all vectors: each
shard's inner products with the queries, merged into a running top-k).

Usage::

    python benchmarks/bench_archive.py --n 1000000                 # ~15 min on 2 cores
    nice -n 19 python benchmarks/bench_archive.py --n 10000000    # the archive run
    python benchmarks/bench_archive.py --n 100000 --nlist 256 --nprobe 8 16 --refine 1 10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the machine is shared: do not spin-wait
import faiss  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CACHE = Path("/tmp/lgffem-archive-real-embeddings.npy")
DIM = 512


# ---------------------------------------------------------------------------------------------
# Real embeddings and the fitted distribution


def _real_images(data: Path, per_folder: int, slide_crops: int, seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for folder in ("lc25000_lung/gallery", "lc25000_colon/gallery", "crc_samples"):
        found = sorted(p for p in (data / folder).rglob("*") if p.suffix.lower() in (".jpg", ".png", ".tif", ".tiff"))
        paths += [found[i] for i in sorted(rng.choice(len(found), min(per_folder, len(found)), replace=False))]
    images = [Image.open(p).convert("RGB") for p in paths]
    slides = [Image.open(p).convert("RGB") for p in sorted((data / "slides").glob("*"))]
    for i in range(slide_crops):
        slide = slides[i % len(slides)]
        x = int(rng.integers(0, slide.width - 224))
        y = int(rng.integers(0, slide.height - 224))
        images.append(slide.crop((x, y, x + 224, y + 224)))
    return images


def embed_real(data: Path, out: Path, per_folder: int = 200, slide_crops: int = 160) -> None:
    """Embed the real patches of ``data`` with the default model and save them to ``out`` (.npy)."""
    import torch

    from index_build.models import load_model

    torch.set_num_threads(2)
    images = _real_images(data, per_folder, slide_crops)
    logger.info("embedding %d real patches", len(images))
    embedder = load_model("default", device="cpu")
    vectors = []
    for i in tqdm(range(0, len(images), 32), desc="embed real patches", unit="batch"):
        vectors.append(embedder.embed_images(images[i : i + 32]))
    xb = np.concatenate(vectors).astype(np.float32)
    np.save(out, xb)
    logger.info("embedded %d real patches -> %s", len(xb), out)


def real_embeddings(data: Path = DATA, cache: Optional[Path] = None) -> np.ndarray:
    """The default model's embeddings of the real patches (computed once in a child process, cached)."""
    cache = cache or REAL_CACHE
    if not cache.exists():
        if not data.is_dir():
            raise FileNotFoundError(f"error: real data folder {data} not found (needed once to fit the distribution)")
        subprocess.run([sys.executable, __file__, "--embed-only", "--data", str(data)], check=True)
    return np.load(cache)


@dataclass
class ArchiveDistribution:
    """Vectors clustered around real embeddings with the fitted local spread (see the module docstring)."""

    anchors: np.ndarray  # R x d real embeddings, L2-normalised
    basis: np.ndarray  # d x rank principal directions of the local spread
    sd: np.ndarray  # rank standard deviations along them
    iso: float  # isotropic standard deviation of the remainder (per dimension)
    region_share: float = 0.6  # share of the variance between a region centre and its anchor
    patches_per_region: int = 200

    @classmethod
    def fit(cls, real: np.ndarray, rank: int = 64, **kwargs) -> ArchiveDistribution:
        real = real / np.linalg.norm(real, axis=1, keepdims=True)
        sims = real @ real.T
        np.fill_diagonal(sims, -np.inf)
        diffs = real - real[sims.argmax(1)]
        cov = diffs.T @ diffs / (2 * len(diffs))  # one patch around a shared centre: half of a difference
        values, vectors = np.linalg.eigh(cov.astype(np.float64))
        values, vectors = values[::-1], vectors[:, ::-1]
        d = real.shape[1]
        iso = float(np.sqrt(max(values[rank:].sum(), 0.0) / (d - rank)))
        sd = np.sqrt(np.clip(values[:rank], 0, None))
        return cls(real.astype(np.float32), vectors[:, :rank].astype(np.float32), sd.astype(np.float32), iso, **kwargs)

    def _noise(self, n: int, share: float, rng: np.random.Generator) -> np.ndarray:
        d, rank = self.basis.shape
        z = rng.standard_normal((n, rank), dtype=np.float32) * (self.sd * np.float32(np.sqrt(share)))
        noise = z @ self.basis.T
        noise += rng.standard_normal((n, d), dtype=np.float32) * np.float32(self.iso * np.sqrt(share))
        return noise

    def regions(self, n: int, seed: int) -> np.ndarray:
        """Region centres for a collection of ``n`` vectors (one per ``patches_per_region``)."""
        rng = np.random.default_rng(seed)
        count = max(1, n // self.patches_per_region)
        centres = self.anchors[rng.integers(0, len(self.anchors), count)]
        centres = centres + self._noise(count, self.region_share, rng)
        return centres / np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(self, regions: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` L2-normalised float32 vectors around uniformly chosen ``regions``."""
        x = regions[rng.integers(0, len(regions), n)]
        x += self._noise(n, 1.0 - self.region_share, rng)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def nn_cosine(x: np.ndarray) -> np.ndarray:
    """Cosine of every row of ``x`` with its nearest other row."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return sims.max(1)


# ---------------------------------------------------------------------------------------------
# Measurements


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def recall_at_k(exact: np.ndarray, approx: np.ndarray, k: int) -> float:
    """Mean overlap of the top-``k`` id sets."""
    return float(np.mean([len(set(e[:k]) & set(a[:k])) / k for e, a in zip(exact, approx)]))


def ivf_memory_bytes(index: faiss.Index) -> int:
    """Bytes the index takes when fully loaded: coarse quantizer, codebooks, and every list's codes + ids."""
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    sizes = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    lists = int(sizes.sum()) * (ivf.code_size + 8)
    quantizer = len(faiss.serialize_index(ivf.quantizer))
    empty = faiss.clone_index(ivf) if isinstance(invlists, faiss.ArrayInvertedLists) else None
    rest = 0
    if empty is None:  # on-disk lists: the codebooks are the serialised index minus quantizer and list headers
        pq = getattr(faiss.downcast_index(ivf), "pq", None)
        rest = pq.centroids.size() * 4 if pq is not None else 0
    else:
        empty.reset()
        rest = len(faiss.serialize_index(empty)) - quantizer
    return lists + quantizer + rest


class Shards:
    """The float16 shards of the collection, memory-mapped, with exact re-ranking."""

    def __init__(self, paths: list[Path], shard_size: int, d: int = DIM):
        self.maps = [np.memmap(p, dtype=np.float16, mode="r").reshape(-1, d) for p in paths]
        self.shard_size = shard_size

    def gather(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.maps[0].shape[1]), dtype=np.float32)
        shard, offset = np.divmod(ids, self.shard_size)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            order = np.argsort(offset[rows])  # sorted reads are kinder to the disk
            out[rows[order]] = self.maps[s][offset[rows[order]]]
        return out

    def rerank(self, xq: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of each query among its candidate ``ids`` (``-1`` = none)."""
        dists = np.full((len(xq), k), -np.inf, dtype=np.float32)
        out = np.full((len(xq), k), -1, dtype=np.int64)
        for q in range(len(xq)):
            cand = ids[q][ids[q] >= 0]
            scores = self.gather(cand) @ xq[q]
            top = np.argsort(-scores, kind="stable")[:k]
            dists[q, : len(top)], out[q, : len(top)] = scores[top], cand[top]
        return dists, out


def search(index, shards: Optional[Shards], xq: np.ndarray, k: int, refine: int):
    if refine <= 1 or shards is None:
        return index.search(xq, k)
    _, cand = index.search(xq, k * refine)
    return shards.rerank(xq, cand, k)


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict:
    root = Path(args.root)
    if root.exists():
        shutil.rmtree(root)
    (root / "blocks").mkdir(parents=True)
    faiss.omp_set_num_threads(args.threads)
    n, d, k = args.n, DIM, args.k
    t_all = time.perf_counter()

    real = real_embeddings(Path(args.data), cache=REAL_CACHE)
    dist = ArchiveDistribution.fit(real, region_share=args.region_share, patches_per_region=args.patches_per_region)
    regions = dist.regions(n, seed=args.seed)
    # one synthetic vector around every real one, with the whole fitted spread: its nearest
    # neighbour cosine should match that of the real embeddings
    synthetic = dist.anchors + dist._noise(len(real), 1.0, np.random.default_rng(args.seed + 7))
    real_nn, syn_nn = nn_cosine(real), nn_cosine(synthetic)
    fit = {
        "real": len(real),
        "iso_sd": dist.iso,
        "top_sd": float(dist.sd[0]),
        "real_nn_cos_median": float(np.median(real_nn)),
        "synthetic_nn_cos_median": float(np.median(syn_nn)),
        "real_nn_cos_p10_p90": [float(np.percentile(real_nn, 10)), float(np.percentile(real_nn, 90))],
        "synthetic_nn_cos_p10_p90": [float(np.percentile(syn_nn, 10)), float(np.percentile(syn_nn, 90))],
    }
    print(f"fit: {json.dumps(fit)}", flush=True)

    xq = dist.draw(regions, args.nq, np.random.default_rng(args.seed + 1))
    xq = xq.astype(np.float16).astype(np.float32)
    gt_d = np.full((args.nq, k), -np.inf, dtype=np.float32)
    gt_i = np.full((args.nq, k), -1, dtype=np.int64)

    shard_size = min(args.shard_size, n)
    count = -(-n // shard_size)
    rng = np.random.default_rng(args.seed + 2)
    index = trained = None
    paths, blocks = [], []
    t_build = time.perf_counter()
    t_train = t_add = t_gt = t_gen = 0.0
    with tqdm(total=n, desc=f"stream {n:,} vectors", unit="vec", unit_scale=True, smoothing=0.1) as bar:
        for s in range(count):
            rows = min(shard_size, n - s * shard_size)
            t0 = time.perf_counter()
            x = dist.draw(regions, rows, rng).astype(np.float16)
            path = root / f"shard-{s:05d}.f16"
            x.tofile(path)
            paths.append(path)
            x = x.astype(np.float32)
            t_gen += time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = xq @ x.T  # the chunked brute force: this shard's part of the exact search
            top = np.argpartition(-scores, min(k, rows - 1), axis=1)[:, :k]
            cat_d = np.concatenate([gt_d, np.take_along_axis(scores, top, 1)], axis=1)
            cat_i = np.concatenate([gt_i, top + s * shard_size], axis=1)
            order = np.argsort(-cat_d, axis=1, kind="stable")[:, :k]
            gt_d, gt_i = np.take_along_axis(cat_d, order, 1), np.take_along_axis(cat_i, order, 1)
            del scores
            t_gt += time.perf_counter() - t0
            if trained is None:
                t0 = time.perf_counter()
                trained = faiss.index_factory(d, args.factory, faiss.METRIC_INNER_PRODUCT)
                ivfpq = faiss.downcast_index(faiss.extract_index_ivf(trained))
                ivfpq.cp.niter = args.niter  # k-means iterations of the coarse quantizer
                if isinstance(ivfpq, faiss.IndexIVFPQ):  # polysemous codes are not used; their training is slow
                    ivfpq.do_polysemous_training = False
                    ivfpq.pq.cp.niter = args.niter
                sample = x[np.random.default_rng(args.seed + 3).choice(rows, min(rows, args.train_size), replace=False)]
                bar.set_postfix_str(f"training {args.factory} on {len(sample):,}")
                trained.train(sample)
                del sample
                faiss.write_index(trained, str(root / "trained.index"))
                t_train = time.perf_counter() - t0
                bar.set_postfix_str("")
            t0 = time.perf_counter()
            block = faiss.clone_index(trained)
            block.add_with_ids(x, np.arange(s * shard_size, s * shard_size + rows, dtype=np.int64))
            block_path = root / "blocks" / f"block-{s:05d}.index"
            faiss.write_index(block, str(block_path))
            blocks.append(str(block_path))
            del block, x
            t_add += time.perf_counter() - t0
            bar.update(rows)
    t0 = time.perf_counter()
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(str(root / "trained.index"))
    merge_ondisk(index, blocks, str(root / "merged.ivfdata"))
    faiss.write_index(index, str(root / "populated.index"))
    t_merge = time.perf_counter() - t0
    build_s = time.perf_counter() - t_build
    build_peak = peak_rss_mb()
    shutil.rmtree(root / "blocks")
    del index

    exact_bytes = n * d * 4
    rss_before = current_rss_mb()
    index = faiss.read_index(str(root / "populated.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    memory = ivf_memory_bytes(index)
    disk = (root / "populated.index").stat().st_size + (root / "merged.ivfdata").stat().st_size
    shards = Shards(paths, shard_size)
    ivf = faiss.extract_index_ivf(index)

    rows = []
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        for refine in args.refine:
            faiss.omp_set_num_threads(args.threads)
            t0 = time.perf_counter()
            _, ids = search(index, shards, xq, k, refine)
            batch_s = time.perf_counter() - t0
            faiss.omp_set_num_threads(1)
            times = []
            for q in range(min(args.single, args.nq)):
                t0 = time.perf_counter()
                search(index, shards, xq[q : q + 1], k, refine)
                times.append((time.perf_counter() - t0) * 1000)
            row = {
                "nprobe": nprobe,
                "refine": refine,
                "recall@10": recall_at_k(gt_i, ids, k),
                "p50_ms": statistics.median(times),
                "p99_ms": float(np.percentile(times, 99)),
                "qps_batch": args.nq / batch_s,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "n": n,
        "factory": args.factory,
        "shards": count,
        "shard_size": shard_size,
        "train_size": min(shard_size, args.train_size),
        "build_s": build_s,
        "gen_s": t_gen,
        "gt_s": t_gt,
        "train_s": t_train,
        "add_s": t_add,
        "merge_s": t_merge,
        "build_peak_rss_mb": build_peak,
        "exact_mb": exact_bytes / 2**20,
        "index_memory_mb": memory / 2**20,
        "memory_ratio": exact_bytes / memory,
        "index_disk_mb": disk / 2**20,
        "vectors_disk_mb": sum(p.stat().st_size for p in paths) / 2**20,
        "rss_after_load_mb": current_rss_mb() - rss_before,
        "total_s": time.perf_counter() - t_all,
        "fit": fit,
        "rows": rows,
    }
    if not args.keep:
        shutil.rmtree(root)
    return result


def format_table(result: dict) -> str:
    lines = [
        f"N = {result['n']:,}, `{result['factory']}` + exact re-rank from the float16 shards; "
        f"build {result['build_s'] / 60:.1f} min (generate {result['gen_s']:.0f} s, exact top-10 "
        f"{result['gt_s']:.0f} s, train {result['train_s']:.0f} s, add {result['add_s']:.0f} s, merge "
        f"{result['merge_s']:.0f} s), build peak RSS {result['build_peak_rss_mb']:,.0f} MB; index "
        f"{result['index_memory_mb']:,.0f} MB in memory = 1/{result['memory_ratio']:.1f} of the exact "
        f"{result['exact_mb']:,.0f} MB, {result['index_disk_mb']:,.0f} MB on disk (+ "
        f"{result['vectors_disk_mb']:,.0f} MB float16 shards read by the re-rank)",
        "",
        "| nprobe | re-rank k x | recall@10 | p50 ms (1 thread) | p99 ms | batch q/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['nprobe']} | {row['refine']} | {row['recall@10']:.4f} | {row['p50_ms']:.2f} | "
            f"{row['p99_ms']:.2f} | {row['qps_batch']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--factory", default=None, help="FAISS factory string (default: IVF<nlist>,PQ64)")
    parser.add_argument("--nlist", type=int, default=None, help="default: sqrt(n) rounded to a power of two")
    parser.add_argument("--train-size", type=int, default=None, help="default: 64 x nlist, at most one shard")
    parser.add_argument("--niter", type=int, default=10, help="k-means iterations (coarse and PQ)")
    parser.add_argument("--shard-size", type=int, default=250_000)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--refine", type=int, nargs="+", default=[1, 10, 20], help="re-rank k x this many")
    parser.add_argument("--nq", type=int, default=500, help="queries (recall, batch q/s)")
    parser.add_argument("--single", type=int, default=200, help="single queries timed")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--region-share", type=float, default=0.6)
    parser.add_argument("--patches-per-region", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="/tmp/archive-bench", help="shards and index (deleted unless --keep)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--embed-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.embed_only:
        embed_real(Path(args.data), REAL_CACHE)
        return {}
    if args.nlist is None:
        args.nlist = int(2 ** round(np.log2(np.sqrt(args.n))))
    if args.train_size is None:
        args.train_size = 64 * args.nlist
    if args.factory is None:
        args.factory = f"IVF{args.nlist},PQ64"
    result = run(args)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
