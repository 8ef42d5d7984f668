"""The subset manifest of a controlled study: the hidden subset ("regime") of every image.

``subsets.parquet`` at a dataset's root, one row per image: ``image`` (path relative to the root, POSIX
separators), ``split``, ``subset`` (an integer) and ``subset_name``. Written by the generator, read by
the datasets (each sample's ``subset``), the analysis and the oracle; never a training signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from divdr.data.errors import DatasetError

SUBSET_MANIFEST = "subsets.parquet"
UNKNOWN_SUBSET = -1
MANIFEST_SCHEMA = pa.schema(
    [("image", pa.string()), ("split", pa.string()), ("subset", pa.int64()), ("subset_name", pa.string())]
)


@dataclass(frozen=True)
class SubsetEntry:
    """One row of the subset manifest: the hidden subset of an image (the controlled study's truth)."""

    image: str  # path relative to the dataset root, POSIX separators
    split: str
    subset: int
    subset_name: str


def write_subset_manifest(path: Path, entries: list[SubsetEntry]) -> None:
    """Write the manifest as Parquet with MANIFEST_SCHEMA (one row per image)."""
    columns = {name: [getattr(e, name) for e in entries] for name in MANIFEST_SCHEMA.names}
    pq.write_table(pa.table(columns, schema=MANIFEST_SCHEMA), path)


def read_subset_manifest(path: Path) -> dict[str, SubsetEntry]:
    """The manifest keyed by image path; raises DatasetError naming the file and the bad column/row."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"cannot read subset manifest {path}: {err}") from err
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if missing:
        raise DatasetError(f"subset manifest {path}: missing column(s) {missing}; expected {MANIFEST_SCHEMA.names}")
    for field in MANIFEST_SCHEMA:
        actual = table.schema.field(field.name).type
        if not (actual == field.type or (pa.types.is_integer(field.type) and pa.types.is_integer(actual))
                or (pa.types.is_string(field.type) and pa.types.is_large_string(actual))):
            raise DatasetError(
                f"subset manifest {path}: column {field.name!r} has type {actual}, expected {field.type}")
    entries: dict[str, SubsetEntry] = {}
    for row in table.select(MANIFEST_SCHEMA.names).to_pylist():
        if row["image"] is None or row["subset"] is None:
            raise DatasetError(f"subset manifest {path}: null 'image' or 'subset' in row {row}")
        if row["image"] in entries:
            raise DatasetError(f"subset manifest {path}: image {row['image']!r} is listed twice")
        entries[row["image"]] = SubsetEntry(row["image"], row["split"] or "", int(row["subset"]),
                                            row["subset_name"] or "")
    return entries


def subset_names(root: Path) -> dict[int, str]:
    """Subset id -> its name (the regime's, e.g. ``large``; the id as text where unnamed) from the
    manifest at ``root``; empty when ``root`` has no manifest."""
    path = Path(root) / SUBSET_MANIFEST
    if not path.exists():
        return {}
    return {e.subset: e.subset_name or str(e.subset) for e in read_subset_manifest(path).values()}
