"""The on-disk store of an index: its files, the commit journal that makes writes atomic, the
writer lock, the manifest and the thumbnail codec (:mod:`index_build.store.storage`)."""

from index_build._layout import lazy_exports

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        name: "storage"
        for name in (
            "INDEX_FILE",
            "MANIFEST_FILE",
            "METADATA_FILE",
            "IndexBusyError",
            "IndexLoadError",
            "decode_thumbnail",
            "has_index",
            "index_lock",
            "make_thumbnail",
            "write_atomic",
        )
    },
)
