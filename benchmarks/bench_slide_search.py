"""Slide-level search on synthetic slides: is a same-class slide ranked first?

Writes synthetic pyramidal TIFF slides (``benchmarks/synthetic_slides.py``) of the five LC25000
classes: ``--gallery`` slides per class from the gallery patches (each slide its own patches) and
``--queries`` slides per class from the query split's patches (no patch, and no near-duplicate
group, shared with the gallery), indexes the gallery slides with ``python -m index_build``, then
ranks the gallery slides for every query slide with :func:`index_build.slide_search.search_slide`
and prints the table and the share of queries whose rank-1 slide has the query's class.

    python benchmarks/bench_slide_search.py --work /tmp/bench_slides
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic_slides import class_patches, write_synthetic_slide  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = {
    "lung_aca": "lc25000_lung",
    "lung_n": "lc25000_lung",
    "lung_scc": "lc25000_lung",
    "colon_aca": "lc25000_colon",
    "colon_n": "lc25000_colon",
}


def write_slides(work: Path, gallery: int, queries: int, size: int, tissue: float, per_slide: int) -> None:
    for split, count in (("gallery", gallery), ("query", queries)):
        for c, (label, dataset) in enumerate(CLASSES.items()):
            patches = class_patches(DATA / dataset / split / label)
            folder = work / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                chosen = patches[i * per_slide : (i + 1) * per_slide]
                path = folder / f"{label}_{i}.tif"
                if not path.exists():
                    write_synthetic_slide(path, chosen, size=size, tissue=tissue, levels=3, seed=100 * c + i)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_slide_search"))
    parser.add_argument("--gallery", type=int, default=3, help="gallery slides per class")
    parser.add_argument("--queries", type=int, default=2, help="query slides per class")
    parser.add_argument("--size", type=int, default=1344, help="slide side in pixels (cells of 224 px)")
    parser.add_argument("--tissue", type=float, default=0.5, help="share of tissue cells")
    parser.add_argument("--per-slide", type=int, default=20, help="distinct patches per slide")
    parser.add_argument("--mosaic-size", type=int, default=8)
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)

    from index_build.__main__ import main as build_main
    from index_build.models import load_model
    from index_build.slide_search import search_slide

    start = time.perf_counter()
    write_slides(args.work, args.gallery, args.queries, args.size, args.tissue, args.per_slide)
    written = time.perf_counter()
    out = args.work / "index"
    flags = ["--overwrite"] if (out / "manifest.json").exists() else []
    index = build_main([str(args.work / "gallery"), "--out", str(out), "--model", args.model, "--no-progress", *flags])
    built = time.perf_counter()
    embedder = load_model(args.model)
    rows = []
    for query in sorted((args.work / "query").rglob("*.tif")):
        truth = query.parent.name
        hits = search_slide(index, embedder, query, mosaic_size=args.mosaic_size)
        rank = next((r for r, h in enumerate(hits, 1) if h.label == truth), None)
        rows.append((query.name, truth, hits[0].slide, hits[0].label, hits[0].score, hits[0].matched_tiles, rank))
    searched = time.perf_counter()
    print("| query slide | class | rank-1 slide | its class | score | mosaic tiles matched | first same-class rank |")
    print("|---|---|---|---|---|---|---|")
    for name, truth, top, label, score, matched, rank in rows:
        print(f"| {name} | {truth} | {top} | {label} | {score:.3f} | {matched}/{args.mosaic_size} | {rank} |")
    correct = sum(label == truth for _, truth, _, label, *_ in rows)
    print(
        f"\nsame-class slide at rank 1: {correct}/{len(rows)} = {correct / len(rows):.0%} "
        f"({len(CLASSES)} classes, {args.gallery} gallery slides and {args.queries} query slides per class, "
        f"{len(index)} gallery tiles, mosaic {args.mosaic_size})"
    )
    print(
        f"time: slides {written - start:.0f} s, index {built - written:.0f} s, "
        f"{len(rows)} slide searches {searched - built:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
