"""Embed a dataset into a FAISS index with metadata, and search it (no user interface: that is ``ui/``).

The retrieval core, by concern:

- :mod:`index_build.store`: the on-disk format of an index (files, commit journal, locks, manifest).
- :mod:`index_build.search`: FAISS, :class:`~index_build.search.patch_index.PatchIndex`, building,
  shards, the query path (tiling, merging, decision), galleries, calibration, metrics, evaluation.
- :mod:`index_build.wsi`: whole-slide images (reading, tissue rule, slide indexes, slide search, heat maps).
- :mod:`index_build.inputs`: where data comes from (datasets, ``--model``/``--index`` sources, uploads).
- :mod:`index_build.models` loads a model; :mod:`index_build.index` is the index API in one import;
  ``python -m index_build`` builds an index.

The former flat module names (``index_build.storage``, ``index_build.slides``, ...) still import
(:mod:`index_build._layout`).
"""

from index_build import _layout

_layout.install()
