"""Search: FAISS (``faiss_index``), :class:`PatchIndex` (``patch_index``), building an index
(``embedding``), shards (``shard``), the query path from an image to ranked results and a decision
(``query``), the galleries a page searches (``galleries``), the close-match threshold
(``calibration``), retrieval metrics (``metrics``) and ``python -m index_build.evaluate`` (``evaluate``)."""

from index_build._layout import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "PatchIndex": "patch_index",
        "SearchResult": "patch_index",
        "write_index": "patch_index",
        "build_index": "embedding",
        "make_faiss_index": "faiss_index",
        "merge_shards": "shard",
        "Hit": "query",
        "TiledResult": "query",
        "tiled_search": "query",
        "Galleries": "galleries",
        "close_match_threshold": "calibration",
        "evaluate": "evaluate",
    },
)
