"""The datasets of a grid: built-in names, and CSV files read and parsed at submit time.

A CSV file is read once (whatever the number of blocks naming it), parsed whole
now so a bad file fails the submit and not a worker, and named by its content
hash (``csv:<sha256>``) so the store keeps it once.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import DATASETS, ConfigError
from service.grids.parsed import GridPart, ParsedGrid, Path_
from service.grids.spec import CsvDataset
from service.settings import get_settings


@dataclass(frozen=True)
class CsvFile:
    """A user CSV named by the grid, read at parse time, stored by content hash at submit."""

    name: str  # file name, for the record
    sha256: str
    data: bytes


@dataclass
class Dim:
    """One factor of the product: one axis, or several zipped axes, or the sample index."""

    keys: tuple[str, ...]
    rows: list[tuple[Any, ...]]  # each row gives a value to every key
    paths: list[tuple[Path_, ...]]  # where each row's values were written


class Datasets(GridPart):
    """The datasets axis of each block, the CSV files read for it and their labels."""

    def __init__(self, parsed: ParsedGrid) -> None:
        super().__init__(parsed)
        self.csv_files: dict[str, CsvFile] = {}
        self.csv_labels: dict[str, str] = {}  # label or path as written -> dataset name

    def rows(self, entries: tuple[str | CsvDataset, ...], path: Path_) -> Dim:
        rows, paths = [], []
        for i, entry in enumerate(entries):
            where = (*path, i) if len(entries) > 1 or isinstance(self._raw(path), list) else path
            if isinstance(entry, str):
                if entry not in DATASETS:
                    raise self.error(
                        where,
                        f"unknown dataset {entry!r}; expected one of {', '.join(DATASETS)} "
                        "or {csv: path, target: column}",
                    )
                rows.append((entry, None, None))
            else:
                rows.append(self.csv_row(entry, where))
            paths.append((where, where, where))
        seen = set()
        for row, where in zip(rows, paths, strict=True):
            if row in seen:
                raise self.error(where[0], f"dataset {row[0]!r} is listed twice")
            seen.add(row)
        return Dim(("dataset", "target", "task"), rows, paths)

    def _read_bounded(self, file: Path, where: Path_) -> bytes:
        """The file's bytes, if it is a regular file of at most MLPQ_MAX_CSV_BYTES."""
        limit = get_settings().max_csv_bytes
        try:
            with file.open("rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise self.error(where, f"{file} is not a regular file")
                data = fh.read(limit + 1)
        except FileNotFoundError:
            raise self.error(where, f"no such file: {file}") from None
        except OSError as exc:
            raise self.error(where, f"cannot read {file}: {exc}") from None
        if len(data) > limit:
            raise self.error(
                where, f"{file.name} is larger than {limit:,} bytes (MLPQ_MAX_CSV_BYTES)"
            )
        return data

    def csv_row(self, entry: CsvDataset, where: Path_) -> tuple[str, str, str | None]:
        file = (self.parsed.base_dir / entry.csv).resolve()
        key = str(file)
        if key not in self.csv_files:
            data = self._read_bounded(file, (*where, "csv"))
            self.csv_files[key] = CsvFile(
                name=file.name, sha256=hashlib.sha256(data).hexdigest(), data=data
            )
        csv = self.csv_files[key]
        name = f"csv:{csv.sha256}"
        try:
            # The whole file is parsed now, so a bad CSV fails the submit, not a worker.
            from engine.datasets import load_dataset  # NumPy: only for a grid with a CSV

            load_dataset(name, seed=0, csv=csv.data, target=entry.target, task=entry.task)
        except ConfigError as exc:
            sub = "target" if exc.key == "target" else "task" if exc.key == "task" else "csv"
            raise self.error((*where, sub), f"{file.name}: {exc.problem}") from None
        for label in (entry.name, entry.csv, file.name):
            if label:
                self.csv_labels[label] = name
        return (name, entry.target, entry.task)

    def names(self, raw: Any, where: Path_) -> list[str]:
        names = raw if isinstance(raw, list) else [raw]
        out = []
        for n in names:
            if isinstance(n, str) and n in DATASETS:
                out.append(n)
            elif isinstance(n, str) and n in self.csv_labels:
                out.append(self.csv_labels[n])
            elif isinstance(n, str) and n.startswith("csv:"):
                out.append(n)
            else:
                raise self.error(where, f"{n!r} is not a dataset of this grid")
        return out
