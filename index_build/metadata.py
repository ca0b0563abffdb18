"""Per-row metadata from a CSV (``python -m index_build ... --metadata CSV``): organ, site, case, stain, anything.

The CSV has a header; its key column is ``slide`` (a slide build: the slide's path relative to the
folder, or its bare file name) or ``file`` (an image build: the row's ``source``, or its bare file
name). Every other column becomes a metadata column of the index, typed by its values: integers
(``int64``) when every non-empty cell is an integer, else numbers (``float64``) when every one is a
number, else text; an empty cell is a missing value. Rows the CSV does not list get missing values.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Union

import pyarrow as pa

__all__ = ["RESERVED_COLUMNS", "add_metadata", "read_metadata_csv"]

RESERVED_COLUMNS = frozenset({"id", "label", "source", "thumbnail", "image", "slide", "x", "y", "size0", "mpp"})


def _typed(name: str, cells: list[str]) -> tuple[list[Any], pa.DataType]:
    present = [c for c in cells if c != ""]
    for kind, convert in ((pa.int64(), int), (pa.float64(), float)):
        try:
            [convert(c) for c in present]
        except ValueError:
            continue
        return [convert(c) if c != "" else None for c in cells], kind
    return [c if c != "" else None for c in cells], pa.string()


def read_metadata_csv(path: Union[str, Path], key: str) -> tuple[dict[str, int], dict[str, tuple[list, pa.DataType]]]:
    """``(key value -> CSV row, column -> (typed values, Arrow type))`` of a metadata CSV keyed by ``key``.

    Raises:
        ValueError: no header or no ``key`` column, a reserved or repeated column name, an empty or
            repeated key.
    """
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = [name.strip() for name in next(reader, [])]
        lines = [row for row in reader if any(cell.strip() for cell in row)]
    if key not in header:
        raise ValueError(f"{path}: the metadata CSV needs a header with a {key!r} column, got {header}")
    names = [name for name in header if name != key]
    bad = sorted({n for n in names if n in RESERVED_COLUMNS or not n} | {n for n in names if names.count(n) > 1})
    if bad:
        raise ValueError(f"{path}: metadata columns {bad} are empty, repeated or reserved ({sorted(RESERVED_COLUMNS)})")
    keys: dict[str, int] = {}
    for number, row in enumerate(lines):
        row = [cell.strip() for cell in row] + [""] * (len(header) - len(row))
        value = row[header.index(key)]
        if not value:
            raise ValueError(f"{path}: a row has an empty {key!r}")
        if value in keys:
            raise ValueError(f"{path}: {key} {value!r} is listed twice")
        keys[value] = number
    cells = {n: [([c.strip() for c in r] + [""] * len(header))[header.index(n)] for r in lines] for n in names}
    return keys, {n: _typed(n, cells[n]) for n in names}


def add_metadata(dataset, path: Union[str, Path], key: str):
    """``dataset`` with the CSV's metadata columns, matched on its ``slide`` (``key="slide"``) or ``source``
    (``key="file"``) column, by full value or bare file name.

    Raises:
        ValueError: the CSV is malformed (:func:`read_metadata_csv`), names a column the dataset has,
            or lists keys that match no row (named, so that a typo does not go unnoticed).
    """
    keys, columns = read_metadata_csv(path, key)
    clash = sorted(set(columns) & set(dataset.column_names))
    if clash:
        raise ValueError(f"{path}: metadata columns {clash} are already columns of the dataset")
    own = dataset.with_format(None).select_columns(["slide" if key == "slide" else "source"])
    values = own[own.column_names[0]]
    rows: list[Optional[int]] = []
    used: set[str] = set()
    for value in values:
        name = value.rsplit("/", 1)[-1]
        hit = value if value in keys else (name if name in keys else None)
        rows.append(keys[hit] if hit is not None else None)
        if hit is not None:
            used.add(hit)
    unused = sorted(set(keys) - used)
    if unused:
        raise ValueError(f"{path}: {len(unused)} {key} values match no row of the dataset: {', '.join(unused[:5])}")
    for name, (typed, kind) in columns.items():
        dataset = dataset.add_column(name, pa.array([typed[r] if r is not None else None for r in rows], kind))
    return dataset
