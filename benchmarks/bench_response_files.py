"""The page's results folder over many searches: does it stay under its bound?

Each simulated search writes what the Search tab writes: ``results.csv`` and ``results.zip`` (the
query and 8 result thumbnails, ``index_build.display.write_export``) and the response images (8
results, the tile overview and the tile as the model saw it, ``ResponseFiles.writer``). The query is
a 1000 x 1000 noisy image (PNG does not compress it much, like tissue). Prints the folder's size
after every 100 searches and its maximum.

    .venv/bin/python benchmarks/bench_response_files.py --searches 1000
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from index_build.display import MAX_RESPONSE_BYTES, ResponseFiles, write_export  # noqa: E402


def folder_bytes(root: Path) -> int:
    return sum(entry.stat().st_size for folder in os.scandir(root) for entry in os.scandir(folder.path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=1000)
    parser.add_argument("--max-mb", type=float, default=MAX_RESPONSE_BYTES / 2**20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    query = Image.fromarray(rng.integers(120, 230, (1000, 1000, 3), dtype=np.uint8))
    thumbs = [Image.fromarray(rng.integers(120, 230, (224, 224, 3), dtype=np.uint8)) for _ in range(8)]
    files = ResponseFiles(max_bytes=int(args.max_mb * 2**20))
    peak, per_search = 0, None
    print(f"| searches | folder (MB) | bound {args.max_mb:.0f} MB |")
    print("|---|---|---|")
    for i in range(1, args.searches + 1):
        write_export(files.new_folder("export-"), "rank,label\n1,a\n", query, thumbs)
        to_file = files.writer()
        for picture in [*thumbs, query.resize((384, 384)), thumbs[0]]:
            to_file(picture)
        size = folder_bytes(files.root)
        if per_search is None:
            per_search = size
        peak = max(peak, size)
        if i % 100 == 0 or i == args.searches:
            print(f"| {i} | {size / 2**20:.1f} | {'under' if size <= args.max_mb * 2**20 + per_search else 'OVER'} |")
    print(f"\none search writes {per_search / 2**20:.2f} MB; the folder peaked at {peak / 2**20:.1f} MB")


if __name__ == "__main__":
    main()
