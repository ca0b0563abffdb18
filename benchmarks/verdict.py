"""The verdict on the developers' data: coverage and precision of suggestions, mosaics, unseen inputs.

Measures the "Done when" targets of issue 21 with the default model and the decision rule of
``index_build.verdict``, fitted on each gallery exactly as ``python -m index_build`` does
(:func:`index_build.patch_index.gallery_decision`: leave-group-out search, groups from the LC25000
CSVs' ``group_id``):

- LC25000 lung + colon queries (650) against the lung + colon gallery (2,600);
- 2 x 2 mosaics (448 px, searched as 4 tiles of 224 px) of four query patches of one class, and of
  two classes (two patches each, in a random arrangement);
- unseen inputs: every ``crc_samples`` tile and crops of photographs against lung + colon, and the
  colon queries against the lung-only gallery.

A 448 px mosaic of four 224 px patches is cut by ``index_build.query.plan_tiles`` into exactly those
four patches (the script checks the plan), so each tile's embedding is its patch's; the script also
runs ``run_query`` end to end on a few mosaics against a real index and checks that it gives the
same verdicts. Embeddings are cached under ``artifacts/verdict/``.

    .venv/bin/python benchmarks/verdict.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_separation import folder, photo_crops  # noqa: E402

from index_build.calibration import close_match_threshold  # noqa: E402
from index_build.query import plan_tiles  # noqa: E402
from index_build.verdict import VERDICT_K, decide, fit_decision, near_duplicate_groups  # noqa: E402

SETS = {
    "lung_g": "lc25000_lung/gallery",
    "lung_q": "lc25000_lung/query",
    "colon_g": "lc25000_colon/gallery",
    "colon_q": "lc25000_colon/query",
    "crc": "crc_samples",
}


def embedder_for(model: str, global_weight: Optional[float] = None):
    """``load_model(model)``, with the global branch's weight set to ``global_weight`` when given."""
    from index_build.models import Embedder, LgffemImageProcessor, load_model, with_global_weight

    embedder = load_model(model, device="cpu")
    if global_weight is None or global_weight == embedder.model.config.global_weight:
        return embedder
    changed = with_global_weight(embedder.model, global_weight)
    processor = LgffemImageProcessor.from_config(changed.config)
    return Embedder(model=changed, processor=processor, model_id=embedder.model_id)


def load_sets(data: Path, cache: Path, model: str, global_weight: Optional[float] = None) -> dict:
    """Embeddings, labels and files of every set (cached as ``<cache>/<model>/<set>.npz``, where
    ``<model>`` is the config hash and weights fingerprint: another model never reads them)."""
    embedder, out = embedder_for(model, global_weight), {}
    desc = embedder.describe()
    cache = cache / f"{desc['config_hash']}-{desc['weights_fingerprint']}"
    cache.mkdir(parents=True, exist_ok=True)
    for key, rel in [*SETS.items(), ("photos", None)]:
        path = cache / f"{key}.npz"
        if not path.exists():
            if rel is None:
                images, labels, files = photo_crops(), ["photo"] * 40, [f"photo-{i}" for i in range(40)]
            else:
                paths, labels = folder(data / rel)
                images, files = [Image.open(p).convert("RGB") for p in paths], [str(p) for p in paths]
            xb = embedder.embed_images(images, batch_size=32)
            np.savez(path, xb=xb, labels=np.array(labels), files=np.array(files))
        stored = np.load(path)
        labels = stored["labels"] if "labels" in stored else ["photo"] * len(stored["xb"])
        files = stored["files"] if "files" in stored else [f"photo-{i}" for i in range(len(stored["xb"]))]
        out[key] = (stored["xb"], [str(v) for v in labels], [str(v) for v in files])
    return out


class Gallery:
    """A gallery as the index build sees it: vectors, threshold and fitted rule."""

    def __init__(self, parts: list) -> None:
        import faiss

        self.xb = np.concatenate([p[0] for p in parts])
        self.labels = [lab for p in parts for lab in p[1]]
        files = [f for p in parts for f in p[2]]
        self.threshold = close_match_threshold(self.xb)["threshold"]
        groups, how = near_duplicate_groups(files)
        self.rule = fit_decision(self.xb, self.labels, groups, self.threshold, groups_from=how)
        self.index = faiss.IndexFlatIP(self.xb.shape[1])
        self.index.add(self.xb)
        self.scope = sorted(set(self.labels))

    def hits(self, xq: np.ndarray) -> list[list[tuple[str, float]]]:
        scores, ids = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), VERDICT_K)
        return [[(self.labels[i], float(s)) for s, i in zip(row_s, row_i)] for row_s, row_i in zip(scores, ids)]

    def verdicts_single(self, xq: np.ndarray) -> list:
        return [decide([h], self.threshold, self.rule, self.scope) for h in self.hits(xq)]


def summarize(name: str, labels: list, verdicts: list, unseen: bool = False) -> dict:
    kinds = Counter(v.kind for v in verdicts)
    suggested = [v.label == q for q, v in zip(labels, verdicts) if v.kind == "suggestion"]
    return {
        "name": name,
        "n": len(verdicts),
        "coverage": len(suggested) / len(verdicts),
        "precision": (sum(suggested) / len(suggested)) if suggested and not unseen else None,
        "right": None if unseen else sum(suggested) / len(verdicts),
        "kinds": kinds,
    }


def mosaics(sets: dict, gallery: Gallery, rng: np.random.Generator, per_class: int) -> tuple[dict, dict]:
    """Same-class and two-class 2 x 2 mosaics of query patches, decided from their four tiles."""
    scale, tiles = plan_tiles(448, 448, 224)
    assert scale == 1.0 and [t.box for t in tiles] == [
        (0, 0, 224, 224),
        (224, 0, 448, 224),
        (0, 224, 224, 448),
        (224, 224, 448, 448),
    ]
    xq = np.concatenate([sets["lung_q"][0], sets["colon_q"][0]])
    labels = np.array(sets["lung_q"][1] + sets["colon_q"][1])
    hits = gallery.hits(xq)
    by_class = {c: np.flatnonzero(labels == c) for c in sorted(set(labels))}
    same, right = [], []
    for c, rows in by_class.items():
        for _ in range(per_class):
            pick = rng.choice(rows, 4, replace=False)
            v = decide([hits[i] for i in pick], gallery.threshold, gallery.rule, gallery.scope)
            same.append(v)
            right.append(c)
    two, pairs = [], []
    classes = list(by_class)
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            for _ in range(per_class // 2):
                pick = list(rng.choice(by_class[classes[a]], 2, replace=False)) + list(
                    rng.choice(by_class[classes[b]], 2, replace=False)
                )
                rng.shuffle(pick)
                two.append(decide([hits[i] for i in pick], gallery.threshold, gallery.rule, gallery.scope))
                pairs.append({classes[a], classes[b]})
    same_row = summarize("2x2 mosaics, one class (4 tiles)", right, same)
    single = sum(v.kind == "suggestion" for v in two) / len(two)
    both = sum(v.kind == "mixed" and {e.label for e in v.labels} == p for v, p in zip(two, pairs)) / len(two)
    two_row = {"name": "2x2 mosaics, two classes (2 + 2 tiles)", "n": len(two), "coverage": single}
    two_row.update(precision=None, right=None, kinds=Counter(v.kind for v in two), mixed_both=both)
    return same_row, two_row


def end_to_end_check(data: Path, sets: dict, model: str, n: int = 4, global_weight: Optional[float] = None) -> str:
    """``run_query`` on ``n`` real 448 px mosaics against a real lung + colon index: same verdicts?"""
    import tempfile

    from index_build.patch_index import PatchIndex, write_index
    from index_build.search_core import Query, run_query
    from index_build.storage import metadata_table

    embedder = embedder_for(model, global_weight)
    parts = [sets["lung_g"], sets["colon_g"]]
    xb = np.concatenate([p[0] for p in parts])
    labels = [lab for p in parts for lab in p[1]]
    files = [f for p in parts for f in p[2]]
    gallery = Gallery(parts)
    rng = np.random.default_rng(7)
    q_files = sets["lung_q"][2] + sets["colon_q"][2]
    q_x = np.concatenate([sets["lung_q"][0], sets["colon_q"][0]])
    agree = 0
    with tempfile.TemporaryDirectory() as tmp:
        meta = metadata_table(np.arange(len(xb)), labels, files, [b""] * len(xb))
        write_index(Path(tmp) / "idx", xb, meta, embedder)
        index = PatchIndex.load(Path(tmp) / "idx", embedder)
        stored, mine = index.decision_rule, gallery.rule  # the index re-normalises: equal up to float noise
        assert np.allclose(stored["weights"] + [stored["intercept"]], mine["weights"] + [mine["intercept"]], atol=1e-3)
        for _ in range(n):
            pick = rng.choice(len(q_files), 4, replace=False)
            mosaic = Image.new("RGB", (448, 448))
            for j, i in enumerate(pick):
                mosaic.paste(Image.open(q_files[i]).convert("RGB"), ((j % 2) * 224, (j // 2) * 224))
            found = run_query(Query.picture(mosaic), [("index", index)], 8, embedder=embedder, thumbnails=False)
            direct = decide(gallery.hits(q_x[pick]), gallery.threshold, gallery.rule, gallery.scope)
            agree += (found.verdict.kind, found.verdict.label) == (direct.kind, direct.label)
    return f"{agree} of {n} real mosaics through run_query gave the same verdict as the cached tiles"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--cache", default="artifacts/verdict")
    parser.add_argument("--model", default="default")
    parser.add_argument(
        "--mosaics", type=int, default=100, help="same-class mosaics per class (two-class: half per pair)"
    )
    parser.add_argument("--global-weight", type=float, default=None, help="set the global branch's weight")
    parser.add_argument("--end-to-end", type=int, default=4, help="real mosaics checked through run_query")
    args = parser.parse_args()
    data = Path(args.data)
    sets = load_sets(data, Path(args.cache), args.model, args.global_weight)
    both = Gallery([sets["lung_g"], sets["colon_g"]])
    lung = Gallery([sets["lung_g"]])
    q_x = np.concatenate([sets["lung_q"][0], sets["colon_q"][0]])
    q_labels = sets["lung_q"][1] + sets["colon_q"][1]
    rows = [summarize("lung + colon queries", q_labels, both.verdicts_single(q_x))]
    rows += mosaics(sets, both, np.random.default_rng(0), args.mosaics)
    rows.append(summarize("unseen: crc_samples tiles", sets["crc"][1], both.verdicts_single(sets["crc"][0]), True))
    rows.append(summarize("unseen: photo crops", sets["photos"][1], both.verdicts_single(sets["photos"][0]), True))
    rows.append(
        summarize(
            "unseen: colon queries vs lung-only gallery",
            sets["colon_q"][1],
            lung.verdicts_single(sets["colon_q"][0]),
            True,
        )
    )
    rows.append(
        summarize("lung queries vs lung-only gallery", sets["lung_q"][1], lung.verdicts_single(sets["lung_q"][0]))
    )
    for name, g in (("lung + colon", both), ("lung", lung)):
        r = g.rule
        print(
            f"gallery {name}: {len(g.xb)} patches, threshold {g.threshold:.3f}, rule weights {r['weights']} "
            f"intercept {r['intercept']}, leave-group-out coverage {r['coverage']:.3f} precision {r['precision']:.3f} "
            f"({r['sample']} patches, groups: {r['groups']})"
        )
    print()
    print("| queries | gallery | n | suggestion | right (of suggestions) | right suggestion | verdicts |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        gallery_name = (
            "lung" if "lung-only" in row["name"] or row["name"].startswith("lung queries") else "lung + colon"
        )
        precision = "-" if row["precision"] is None else f"{row['precision']:.1%}"
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(row["kinds"].items()))
        if "mixed_both" in row:
            kinds += f"; mixed naming both: {row['mixed_both']:.1%}"
        right = "-" if row["right"] is None else f"{row['right']:.1%}"
        cells = [row["name"], gallery_name, str(row["n"]), f"{row['coverage']:.1%}", precision, right, kinds]
        print("| " + " | ".join(cells) + " |")
    if args.end_to_end:
        print()
        print(end_to_end_check(data, sets, args.model, args.end_to_end, args.global_weight))


if __name__ == "__main__":
    main()
