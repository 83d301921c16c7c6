"""Reading small tables (CSV, TSV, JSON lines) with clear errors, and picking columns by name or position."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TableFormat = Literal["auto", "csv", "tsv", "jsonl"]


class DataError(ValueError):
    """Bad data or data configuration; the message names the file, the problem and the fix."""


@dataclass
class Table:
    """Rows of a file; ``columns`` are header names, or ``"0"``, ``"1"``, … without a header."""

    path: Path
    columns: list[str]
    rows: list[list[Any]]
    has_header: bool

    def column_index(self, key: str | int, role: str) -> int:
        """Position of column ``key`` (a header name, or an int position); ``role`` names it in errors."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and not self.has_header):
            pos = int(key)
            if not 0 <= pos < len(self.columns):
                raise DataError(
                    f"{role} column {key} is out of range in {self.path}: it has {len(self.columns)} columns "
                    f"({self.columns}); set {role}_column to one of them"
                )
            return pos
        if key not in self.columns:
            hint = "" if self.has_header else " (the file is read without a header: use column positions)"
            raise DataError(
                f"{role} column {key!r} not found in {self.path}; its columns are {self.columns}{hint}. "
                f"Set {role}_column to one of them"
            )
        return self.columns.index(key)

    def column(self, key: str | int, role: str) -> list[Any]:
        pos = self.column_index(key, role)
        return [row[pos] if pos < len(row) else None for row in self.rows]


def detect_format(path: Path, file_format: str) -> str:
    if file_format != "auto":
        return file_format
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".json", ".ndjson"}:
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "tsv"


def read_table(
    path: str | Path,
    file_format: TableFormat = "auto",
    header: bool = True,
    quoting: bool = True,
    role: str = "data",
) -> Table:
    """Read a whole table. ``quoting=False`` reads quote marks as ordinary characters (needed for
    sentence files whose text holds unbalanced quotes). Lines end only at ``\\n``/``\\r\\n``: other
    Unicode line breaks inside a sentence stay in the sentence."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{role} file {path} does not exist; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise DataError(f"{role} file {path} is a folder; give the path of a CSV, TSV or JSONL file")
    fmt = detect_format(path, file_format)
    if fmt == "jsonl":
        return _read_jsonl(path, role)
    if fmt not in {"csv", "tsv"}:
        raise DataError(f"unknown file_format {file_format!r}; choose auto, csv, tsv or jsonl")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(
            handle,
            delimiter="," if fmt == "csv" else "\t",
            quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
        )
        try:
            rows = [row for row in reader if row]
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"cannot parse {path} as {fmt.upper()}: {err}") from err
    if header:
        if not rows:
            raise DataError(f"{role} file {path} is empty")
        columns, rows = rows[0], rows[1:]
    else:
        columns = [str(i) for i in range(max((len(r) for r in rows), default=0))]
    if not rows:
        raise DataError(f"{role} file {path} has no data rows")
    return Table(path, columns, rows, header)


def _read_jsonl(path: Path, role: str) -> Table:
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number} is not valid JSON: {err}") from err
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is not a JSON object")
            records.append(record)
    if not records:
        raise DataError(f"{role} file {path} has no data rows")
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    return Table(path, columns, [[r.get(c) for c in columns] for r in records], True)
