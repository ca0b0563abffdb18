"""The index API in one import: ``from index_build.index import PatchIndex, build_index, ...``.

The code lives in four layers, each readable on its own:

- :mod:`index_build.faiss_index`: FAISS construction and search parameters;
- :mod:`index_build.storage`: the on-disk format (atomic writes, commit journal, manifest);
- :mod:`index_build.patch_index`: :class:`PatchIndex` (load, search, append) and :func:`write_index`;
- :mod:`index_build.embedding`: resumable embedding of a dataset and :func:`build_index`.
"""

from __future__ import annotations

from index_build.embedding import (
    ImageRowDataset,
    build_index,
    default_num_workers,
    embed_batches,
    embed_dataset,
)
from index_build.faiss_index import (
    INDEX_TYPES,
    default_index_params,
    make_faiss_index,
    search_parameters,
    set_search_params,
)
from index_build.patch_index import EmbedderLike, PatchIndex, SearchResult, check_manifest_matches, write_index
from index_build.storage import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    INDEX_FILE,
    JOURNAL_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    METADATA_SCHEMA,
    THUMBNAIL_QUALITY,
    THUMBNAIL_SIZE,
    WORK_DIR,
    ImageLike,
    IndexLoadError,
    decode_thumbnail,
    make_thumbnail,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "INDEX_TYPES",
    "JOURNAL_FILE",
    "MANIFEST_FILE",
    "METADATA_FILE",
    "METADATA_SCHEMA",
    "THUMBNAIL_QUALITY",
    "THUMBNAIL_SIZE",
    "WORK_DIR",
    "EmbedderLike",
    "ImageLike",
    "ImageRowDataset",
    "IndexLoadError",
    "PatchIndex",
    "SearchResult",
    "build_index",
    "check_manifest_matches",
    "decode_thumbnail",
    "default_index_params",
    "default_num_workers",
    "embed_batches",
    "embed_dataset",
    "make_faiss_index",
    "make_thumbnail",
    "search_parameters",
    "set_search_params",
    "write_index",
]
