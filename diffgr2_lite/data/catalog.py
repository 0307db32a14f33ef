"""The one in-memory format every dataset is loaded into.

Real Amazon Beauty and the synthetic catalogue both become an :class:`InteractionData`: an item table
(:class:`Catalog`) plus one chronological item sequence per user. Everything downstream (split, retriever,
semantic IDs, teacher, prompts) reads only this, so both datasets share every code path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A data file is missing or malformed. The message says what to do about it."""


@dataclass
class Catalog:
    """Item metadata, indexed by an internal item number 0..n-1."""

    item_ids: list[str]               # external ids (ASINs for Amazon, "S0001" for synthetic)
    titles: list[str]
    brands: list[str | None]          # None when the source has no brand
    categories: list[list[str]]       # category path, most general first, e.g. ["Skin Care", "Face", "Toners"]

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("titles", "brands", "categories"):
            if len(getattr(self, name)) != n:
                raise DataError(f"catalog field {name!r} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.item_ids)

    def leaf(self, item: int) -> str:
        """The most specific category of an item ("Toners"); 'Other' when the path is empty."""
        path = self.categories[item]
        return path[-1] if path else "Other"


@dataclass
class InteractionData:
    """A dataset: a catalogue and each user's items in time order (internal item numbers)."""

    name: str
    catalog: Catalog
    user_ids: list[str]
    sequences: list[list[int]]
    info: dict = field(default_factory=dict)   # provenance (source files, generator seed, ...)

    def __post_init__(self) -> None:
        if len(self.user_ids) != len(self.sequences):
            raise DataError(f"{len(self.user_ids)} users but {len(self.sequences)} sequences")

    def stats(self) -> dict:
        lengths = np.array([len(s) for s in self.sequences])
        n_inter = int(lengths.sum())
        return {
            "users": len(self.sequences),
            "items": len(self.catalog),
            "interactions": n_inter,
            "mean_length": float(lengths.mean()) if len(lengths) else 0.0,
            "median_length": float(np.median(lengths)) if len(lengths) else 0.0,
            "min_length": int(lengths.min()) if len(lengths) else 0,
            "max_length": int(lengths.max()) if len(lengths) else 0,
            "density": n_inter / max(1, len(self.sequences) * len(self.catalog)),
        }
