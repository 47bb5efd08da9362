"""The model catalog (SQLite) and the hard constraints it filters by."""

from gptstore.catalog.store import Catalog, Entry, SourceSync

__all__ = ["Catalog", "Entry", "SourceSync"]
