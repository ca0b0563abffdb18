"""Where inputs come from: datasets (image folders, parquet, Hub ids; ``data``), what a ``--model``
or ``--index`` argument points at (``sources``), and decoded, checked uploads (``uploads``)."""

from index_build._layout import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "load_image_dataset": "data",
        "check_source": "sources",
        "is_hub_id": "sources",
        "resolve_index_dir": "sources",
        "InputError": "uploads",
        "decode_image": "uploads",
        "upload_batch": "uploads",
    },
)
