"""Whole-slide images: reading any slide format at a physical resolution (``reading``), the tissue
rule shared by slides and tiled queries (``tissue``), slide indexes (``slide_index``), slide-level
search (``slide_search``) and similarity heat maps (``heatmap``)."""

from index_build._layout import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Slide": "reading",
        "SlideError": "reading",
        "open_slide": "reading",
        "tile_slide": "reading",
        "load_slide_catalog": "reading",
        "is_tissue": "tissue",
        "tissue_fraction": "tissue",
        "load_slide_dataset": "slide_index",
        "search_slide": "slide_search",
        "similarity_map": "heatmap",
    },
)
