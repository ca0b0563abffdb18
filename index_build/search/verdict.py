"""One verdict per search: a suggestion with its precision in this gallery, a close call, mixed, or no close match.

The decision is calibrated on the gallery itself at build time (like the close-match threshold of
:mod:`index_build.calibration`), by this rule:

    Leave-group-out search: every gallery patch (a seeded sample of at most 5,000) is searched
    against the rest of the gallery, leaving out its own near-duplicates (the patches of its group:
    a ``group_id`` column where the data has one, e.g. the LC25000 CSVs; else its slide; else its
    source file). Its 8 best remaining hits are its evidence:

    - ``share``: the votes of the majority label among the 8 (ties: the label ranked first), / 8;
    - ``margin``: the best similarity of that label minus the best similarity of any other label
      among the 8 (0.1 when no other label is there; clipped to [-0.1, 0.1]);
    - ``top1``: the best similarity minus the close-match threshold (clipped to [-0.1, 0.1]).

    A logistic regression of "the majority label is the patch's own" on these three features
    (L2-regularised on standardised features, Newton's method) estimates the precision of a suggestion on
    that evidence in this gallery. A search result is a **suggestion** when its estimate reaches
    :data:`MIN_PRECISION` (0.97).

:func:`decide` turns the ranked hits of every tissue tile of a query into one :class:`Verdict`:

- a query searched as one tile: no hit at the close-match threshold -> ``no_close_match``; else a
  ``suggestion`` when the estimated precision reaches :data:`MIN_PRECISION`, else a ``close_call``
  naming the labels among the hits with their votes and best similarity;
- a tiled or region query: a tile whose best hit is below the close-match threshold abstains; when
  more than half of the tissue tiles abstain -> ``no_close_match``. Every other tile is *sure*
  when its own estimate reaches :data:`MIN_PRECISION`. When sure tiles name two or more labels (each
  by at least one tile and a tenth of the voting tiles) -> ``mixed`` (each label with its tile
  count); when they name one label and make at least half of the voting tiles -> ``suggestion``
  (its precision: the mean estimate of those tiles); otherwise a ``close_call``.

The verdict names the gallery's scope (its labels): a suggestion is always one of them.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from index_build.inputs.text import escape_text
from index_build.metrics import majority_votes

VERDICT_K = 8  # hits of each tile the evidence looks at
MIN_PRECISION = 0.97  # the estimated precision a suggestion needs
FIT_SAMPLE = 5_000  # gallery patches searched for the fit (seeded sample of larger galleries)
CLIP = 0.1  # margin and top1 features are clipped to [-CLIP, CLIP]
L2 = 1.0  # ridge penalty of the fit (on the weights, not the intercept)
MIXED_SHARE = 0.1  # a second label makes a tiled query "mixed" with this share of the voting tiles (>= 1 tile)
FEATURES = ("share", "margin", "top1")
KINDS = ("suggestion", "close_call", "mixed", "no_close_match")
RULE = (
    "logistic fit, on a leave-group-out search of the gallery (each patch against the rest minus its own "
    "group, slide or source file), of whether the majority label of the 8 best hits is right, on the vote "
    "share, the similarity margin between the best two labels and the top-1 similarity over the threshold; "
    f"a suggestion needs an estimate of at least {MIN_PRECISION:.0%}"
)
# For a gallery with no fitted rule (a single label, or an old IVF index whose vectors cannot be read
# back): a suggestion only on unanimous votes with a clear margin (about 99% at 8 of 8; 96% at 7 of 8).
DEFAULT_RULE: dict[str, Any] = {
    "k": VERDICT_K,
    "features": list(FEATURES),
    "weights": [12.0, 20.0, 10.0],
    "intercept": -8.5,
    "min_precision": MIN_PRECISION,
    "fitted": False,
    "rule": "default for an index built without a fitted decision: " + RULE,
}

__all__ = [
    "DEFAULT_RULE",
    "KINDS",
    "MIN_PRECISION",
    "VERDICT_K",
    "LabelEvidence",
    "Verdict",
    "decide",
    "evidence",
    "estimate",
    "fit_decision",
    "near_duplicate_groups",
    "rule_of",
    "scope_text",
]


# --------------------------------------------------------------------------------------
# Evidence of one ranked hit list
# --------------------------------------------------------------------------------------


def evidence(
    hits: Sequence[tuple[str, float]], threshold: Optional[float], k: int = VERDICT_K
) -> tuple[str, list[float]]:
    """The majority label of the ``k`` best hits and its features ``[share, margin, top1]``.

    Args:
        hits: ``(label, similarity)`` pairs, best first (at least one).
        threshold: the close-match threshold (``None``: top1 is measured from 0.9).
        k: hits looked at (fewer are used as given).
    """
    top = list(hits[:k])
    votes = majority_votes([label for label, _ in top])
    label, count = votes[0]
    best_mine = max(score for lab, score in top if lab == label)
    others = [score for lab, score in top if lab != label]
    margin = best_mine - max(others) if others else CLIP
    top1 = top[0][1] - (threshold if threshold is not None else 0.9)
    clip = lambda v: float(min(CLIP, max(-CLIP, v)))  # noqa: E731
    return str(label), [count / len(top), clip(margin), clip(top1)]


def estimate(features: Sequence[float], rule: dict) -> float:
    """The estimated precision of a suggestion made on ``features`` (:func:`evidence`) by ``rule``."""
    z = float(rule["intercept"]) + float(np.dot(rule["weights"], features))
    return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = 50) -> tuple[np.ndarray, float]:
    """Ridge logistic regression by Newton's method on standardised features: weights and intercept
    for the raw features (so that the penalty treats features of different scales alike)."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    a = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    w = np.zeros(a.shape[1])
    penalty = np.full(a.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (p - y) + penalty * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(penalty) + 1e-9 * np.eye(a.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    weights = w[:-1] / scale
    return weights, float(w[-1] - np.dot(weights, mean))


# --------------------------------------------------------------------------------------
# Groups of near-duplicates
# --------------------------------------------------------------------------------------


def _csv_groups(paths: Sequence[str]) -> dict[str, str]:
    """``resolved path -> group_id`` from CSVs (``path,...,group_id``) in the folders above the files."""
    found: dict[str, str] = {}
    seen_dirs: set[Path] = set()
    for parent in {Path(p).resolve().parent for p in paths}:  # a symlinked image: the CSV beside its target
        for folder in [parent, *list(parent.parents)[:3]]:
            if folder in seen_dirs:
                continue
            seen_dirs.add(folder)
            for table in sorted(folder.glob("*.csv")) if folder.is_dir() else ():
                try:
                    with open(table, newline="") as handle:
                        reader = csv.DictReader(handle)
                        if not reader.fieldnames or not {"path", "group_id"} <= set(reader.fieldnames):
                            continue
                        for row in reader:
                            found[str((folder / row["path"]).resolve())] = f"{table}:{row['group_id']}"
                except (OSError, UnicodeDecodeError, csv.Error):
                    continue
    return found


def near_duplicate_groups(sources: Sequence[str], extra: Optional[dict[str, Sequence]] = None) -> tuple[list[str], str]:
    """The near-duplicate group of every gallery patch, and where it came from.

    A ``group_id`` (or ``group``) metadata column where there is one; else the ``slide`` column
    (a slide index); else the ``group_id`` of a CSV ``path,...,group_id`` in one of the three
    folders above an image file (the LC25000 splits); else the source file itself (a slide
    tile's ``"<slide>@<x>,<y>"`` counts as its slide).
    """
    extra = extra or {}
    for name in ("group_id", "group", "slide"):
        column = extra.get(name)
        if column is not None and any(v is not None for v in column):
            return [f"{name}:{v}" if v is not None else f"source:{s}" for v, s in zip(column, sources)], name
    files = [s for s in sources if Path(s).is_file()] if len(sources) else []
    table = _csv_groups(files) if files else {}
    groups, from_csv = [], 0
    for source in sources:
        group = table.get(str(Path(source).resolve())) if table else None
        from_csv += group is not None
        groups.append(group or "source:" + source.split("@", 1)[0])
    return groups, ("group_id (CSV)" if from_csv else "source file")


# --------------------------------------------------------------------------------------
# Build-time fit
# --------------------------------------------------------------------------------------


def fit_decision(
    vectors: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[str],
    threshold: Optional[float],
    k: int = VERDICT_K,
    max_sample: int = FIT_SAMPLE,
    seed: int = 0,
    groups_from: str = "",
) -> Optional[dict]:
    """Fit the decision rule of a gallery (see the module docstring).

    Args:
        vectors: ``N x D`` unit gallery vectors.
        labels: every patch's label.
        groups: every patch's near-duplicate group (:func:`near_duplicate_groups`).
        threshold: the gallery's close-match threshold.
        k: hits of evidence per patch.
        max_sample: patches searched (seeded sample of larger galleries).
        groups_from: where the groups came from, recorded.

    Returns:
        The rule (JSON-ready): ``k, features, weights, intercept, min_precision, fitted, sample,
        groups, coverage, precision, rule``; ``coverage`` and ``precision`` are those of the
        leave-group-out suggestions themselves. ``None`` when the gallery has a single label or
        too few patches outside any group.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.asarray(labels, dtype=object)
    groups = np.asarray(groups, dtype=object)
    n = len(vectors)
    if n < 2 or len(set(labels.tolist())) < 2:
        return None
    rows = np.arange(n)
    if n > max_sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_sample, replace=False))
    largest = max(Counter(groups.tolist()).values())
    depth = min(n, k + largest)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    features, right = [], []
    for start in range(0, len(rows), 2048):
        part = rows[start : start + 2048]
        scores, ids = index.search(vectors[part], depth)
        for row, row_scores, row_ids in zip(part, scores, ids):
            keep = (row_ids >= 0) & (groups[np.clip(row_ids, 0, None)] != groups[row])
            hits = list(zip(labels[row_ids[keep]][:k], row_scores[keep][:k]))
            if not hits:
                continue
            label, f = evidence(hits, threshold, k)
            features.append(f)
            right.append(label == labels[row])
    if len(features) < 20 or len(set(right)) < 2:
        return None
    x, y = np.asarray(features, dtype=np.float64), np.asarray(right, dtype=np.float64)
    weights, intercept = _logistic(x, y)
    rule = {"k": int(k), "features": list(FEATURES), "weights": [round(float(w), 6) for w in weights]}
    rule["intercept"] = round(intercept, 6)
    rule["min_precision"] = MIN_PRECISION
    sure = np.array([estimate(f, rule) >= MIN_PRECISION for f in x])
    rule.update(
        fitted=True,
        sample=int(len(x)),
        groups=groups_from,
        coverage=round(float(sure.mean()), 6),
        precision=round(float(y[sure].mean()), 6) if sure.any() else None,
        rule=RULE,
    )
    return rule


def rule_of(manifest: dict) -> dict:
    """The fitted decision rule of an index's manifest, or :data:`DEFAULT_RULE` for one without it."""
    rule = manifest.get("decision") if isinstance(manifest, dict) else None
    if isinstance(rule, dict) and {"weights", "intercept"} <= set(rule):
        return rule
    return DEFAULT_RULE


# --------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelEvidence:
    """One label named by a verdict: its votes (hits or tiles), out of how many, and its best similarity."""

    label: str
    count: int
    of: int
    best: float


@dataclass(frozen=True)
class Verdict:
    """What one search concludes (see the module docstring)."""

    kind: str  # one of KINDS
    label: Optional[str]  # the suggested label (suggestion only)
    precision: Optional[float]  # estimated precision of the suggestion in this gallery (suggestion only)
    labels: tuple[LabelEvidence, ...]  # the labels named, with their evidence, most votes first
    unit: str  # what a vote is: "results" (a query searched as one tile) or "tiles"
    tiles: int  # tissue tiles searched
    close_tiles: int  # of them, those with a close match
    skipped: int  # blank-glass tiles, not searched
    best_score: Optional[float]
    threshold: Optional[float]
    scope: tuple[str, ...] = field(default=())  # the labels the gallery holds
    fitted: bool = True  # the rule was fitted on this gallery (False: the default of an old index)

    @property
    def close_share(self) -> float:
        """The share of tissue tiles with a close match."""
        return self.close_tiles / self.tiles if self.tiles else 0.0

    def headline(self, escape=str) -> str:
        """The verdict in one line of plain text (``escape``: applied to each label, e.g. for Markdown)."""
        if self.kind == "suggestion":
            return f"Suggestion: {escape(self.label)}"
        if self.kind == "mixed":
            return "Mixed: " + ", ".join(f"{escape(e.label)} ({e.count} of {e.of} tiles)" for e in self.labels)
        if self.kind == "close_call":
            return "Close call: " + " or ".join(escape(e.label) for e in self.labels)
        return "No close match in this gallery"

    def text(self) -> str:
        """Markdown for the page and the ``/search`` API: headline, evidence, close-match share and scope."""
        head = f"Suggestion: **{escape_text(self.label)}**" if self.kind == "suggestion" else self.headline(escape_text)
        lines = [f"### {head}"]
        where = "in this gallery" + ("" if self.fitted else " (default rule: none could be fitted here)")
        if self.kind == "suggestion":
            lead = self.labels[0]
            agree = f"{lead.count} of {lead.of} {self.unit}"
            lines.append(f"Right about {self.precision:.0%} of the time {where} at this level of agreement ({agree}).")
        elif self.kind == "mixed":
            lines.append("The tiles split between labels: no single suggestion.")
        elif self.kind == "close_call":
            named = "; ".join(
                f"{escape_text(e.label)}: {e.count} of {e.of} {self.unit}, best {e.best:.3f}" for e in self.labels
            )
            lines.append(f"The evidence is not strong enough for a suggestion ({named}).")
        else:
            if self.best_score is not None and self.threshold is not None and self.best_score < self.threshold:
                lines.append(
                    f"The best similarity, {self.best_score:.3f}, is below this gallery's close-match threshold "
                    f"{self.threshold:.3f}."
                )
            elif self.best_score is not None and self.threshold is not None:
                lines.append(
                    f"Fewer than half of the tissue tiles reach this gallery's close-match threshold "
                    f"{self.threshold:.3f} (best similarity {self.best_score:.3f})."
                )
            lines.append("The nearest patches are shown for reference, not as a suggestion.")
        if self.kind != "no_close_match" and self.best_score is not None and self.threshold is not None:
            lines.append(f"Best similarity {self.best_score:.3f} (close-match threshold {self.threshold:.3f}).")
        if self.tiles > 1 or self.skipped:
            lines.append(
                f"{self.close_tiles} of {self.tiles} tissue tiles ({self.close_share:.0%}) have a close match"
                + (f"; {self.skipped} blank tiles skipped." if self.skipped else ".")
            )
        if self.scope:
            lines.append(scope_text(self.scope))
        return "  \n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready fields (for exports and APIs)."""
        return {
            "kind": self.kind,
            "label": self.label,
            "precision": self.precision,
            "labels": [{"label": e.label, "count": e.count, "of": e.of, "best": e.best} for e in self.labels],
            "unit": self.unit,
            "tiles": self.tiles,
            "close_tiles": self.close_tiles,
            "close_share": self.close_share,
            "skipped": self.skipped,
            "best_score": self.best_score,
            "threshold": self.threshold,
            "scope": list(self.scope),
            "fitted": self.fitted,
        }


def scope_text(labels: Sequence[str]) -> str:
    """The gallery's scope in one sentence."""
    named = ", ".join(escape_text(lab) for lab in labels)
    return (
        f"This gallery holds {len(labels)} label{'s' if len(labels) != 1 else ''} ({named}) only: "
        "a query of any other kind gets no right suggestion here."
    )


def _named(hits: Sequence[tuple[str, float]], k: int) -> tuple[LabelEvidence, ...]:
    top = list(hits[:k])
    best: dict[str, float] = {}
    for label, score in top:
        best[label] = max(best.get(label, -1.0), float(score))
    return tuple(
        LabelEvidence(lab, n, len(top), round(best[lab], 6)) for lab, n in majority_votes([lab for lab, _ in top])
    )


def decide(
    per_tile: Sequence[Sequence[tuple[str, float]]],
    threshold: Optional[float],
    rule: Optional[dict],
    labels: Sequence[str] = (),
    skipped: int = 0,
) -> Verdict:
    """The one decision of a search (rule: the module docstring).

    Args:
        per_tile: for every *tissue* tile searched (a query searched whole: one), its ranked hits
            as ``(label, similarity)``, best first; at least ``rule["k"]`` (8) each for the
            calibrated reading (extra ones are ignored, fewer are used as given).
        threshold: the gallery's close-match threshold (``None``: every tile counts as close).
        rule: the gallery's decision rule (:func:`fit_decision`, :func:`rule_of`); ``None``:
            :data:`DEFAULT_RULE`.
        labels: the labels the gallery holds (its scope).
        skipped: blank-glass tiles left out of ``per_tile``.
    """
    rule = rule or DEFAULT_RULE
    k = int(rule.get("k", VERDICT_K))
    floor = float(rule.get("min_precision", MIN_PRECISION))
    tiles = [list(h) for h in per_tile if len(h)]
    scope = tuple(sorted(set(labels)))
    tops = [float(h[0][1]) for h in tiles]
    best = max(tops) if tops else None
    close = [h for h, t in zip(tiles, tops) if threshold is None or t >= threshold]
    common = dict(
        tiles=len(tiles),
        close_tiles=len(close),
        skipped=int(skipped),
        best_score=best,
        threshold=threshold,
        scope=scope,
        fitted=bool(rule.get("fitted", False)),
    )
    single = len(tiles) == 1 and not skipped
    unit = "results" if single else "tiles"
    if not tiles or 2 * len(close) < len(tiles) or not close:
        return Verdict("no_close_match", None, None, (), unit, **common)
    if len(tiles) == 1:
        label, f = evidence(close[0], threshold, k)
        p = estimate(f, rule)
        named = _named(close[0], k)
        if p >= floor:
            return Verdict("suggestion", label, round(p, 6), named[:1], "results", **common)
        return Verdict("close_call", None, None, named, "results", **common)
    votes: list[tuple[str, float, float]] = []  # (label, estimate, top1) of every close tile
    for hits in close:
        label, f = evidence(hits, threshold, k)
        votes.append((label, estimate(f, rule), float(hits[0][1])))
    n = len(votes)

    def tally(items: list[tuple[str, float, float]]) -> tuple[LabelEvidence, ...]:
        counts = Counter(lab for lab, _, _ in items)
        best_of = {lab: max(t for lb, _, t in items if lb == lab) for lab in counts}
        order = sorted(counts, key=lambda lab: (-counts[lab], -best_of[lab], lab))
        return tuple(LabelEvidence(lab, counts[lab], n, round(best_of[lab], 6)) for lab in order)

    sure = [v for v in votes if v[1] >= floor]
    sure_counts = Counter(lab for lab, _, _ in sure)
    strong = [lab for lab, c in sure_counts.items() if c >= max(1, math.ceil(MIXED_SHARE * n))]
    if len(strong) >= 2:
        return Verdict("mixed", None, None, tally([v for v in votes if v[0] in strong]), "tiles", **common)
    if len(strong) == 1 and 2 * sure_counts[strong[0]] >= n:
        mine = [v for v in sure if v[0] == strong[0]]
        p = float(np.mean([v[1] for v in mine]))
        lead = tally(votes)
        lead = tuple(e for e in lead if e.label == strong[0])
        return Verdict("suggestion", strong[0], round(p, 6), lead, "tiles", **common)
    return Verdict("close_call", None, None, tally(votes), "tiles", **common)
