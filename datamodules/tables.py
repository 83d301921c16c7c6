"""Reading small tables (CSV, TSV, JSON lines) with clear errors, and picking columns by name or position."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tlmodules.errors import UserError

TableFormat = Literal["auto", "csv", "tsv", "jsonl"]


class DataError(UserError, ValueError):
    """Bad data or data configuration; the message names the file, the problem and the fix."""


@dataclass
class Table:
    """Rows of a file; ``columns`` are header names, or ``"0"``, ``"1"``, … without a header."""

    path: Path
    columns: list[str]
    rows: list[list[Any]]
    has_header: bool
    sources: list[Path] | None = None  # merged tables: each row's own file (relative paths start at its folder)

    def row_source(self, row: int) -> Path:
        """The file that data row ``row`` (0-based) came from."""
        return self.sources[row] if self.sources is not None else self.path

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
    Unicode line breaks inside a sentence stay in the sentence. A CSV/TSV row with more fields than the header
    (without one: than the first row) is an error naming its line; a row with fewer has missing values."""
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
            rows = _even_rows(reader, path, fmt, header, quoting)
        except (csv.Error, UnicodeDecodeError) as err:
            raise DataError(f"cannot parse {path} as {fmt.upper()}: {err}") from err
    if header:
        if not rows:
            raise DataError(f"{role} file {path} is empty")
        columns, rows = rows[0], rows[1:]
    else:
        columns = [str(i) for i in range(len(rows[0]) if rows else 0)]
    if not rows:
        raise DataError(f"{role} file {path} has no data rows")
    return Table(path, columns, rows, header)


def _even_rows(reader: Any, path: Path, fmt: str, header: bool, quoting: bool) -> list[list[str]]:
    """The non-blank rows of ``reader``, refusing a row with more fields than the first row (the header, or
    the first data row without one): its extra fields would shift or drop columns silently, typically
    because a field holds the separator. Extra fields that are all empty (a trailing separator) are dropped.
    A shorter row stays as it is: its missing fields are missing values."""
    rows: list[list[str]] = []
    end_of_previous = 0  # reader.line_num after the previous record: a record may span several lines
    for row in reader:
        first_line, end_of_previous = end_of_previous + 1, reader.line_num
        if not row:
            continue
        if rows and len(row) > len(rows[0]):
            if any(row[len(rows[0]) :]):
                raise DataError(_ragged_message(path, fmt, header, quoting, rows[0], row, first_line, reader.line_num))
            row = row[: len(rows[0])]
        rows.append(row)
    return rows


def _ragged_message(
    path: Path, fmt: str, header: bool, quoting: bool, first: list[str], row: list[str], start: int, end: int
) -> str:
    lines = f"line {start}" if start == end else f"lines {start}-{end} (one record)"
    reference = f"the header has {len(first)} ({first})" if header else f"the first row has {len(first)}"
    separator = "a comma" if fmt == "csv" else "a tab"
    if quoting:
        fix = f'put the field holding {separator} in double quotes (a quote inside it doubled: "")'
    else:
        fix = f"remove or replace {separator} inside the field (quoting is off, so quotes do not protect it)"
    other = "tsv" if fmt == "csv" else "csv"
    return (
        f"{path} {lines} has {len(row)} fields but {reference}: a field holds the separator ({separator}), or the "
        f"file is not {fmt.upper()}. Fix: {fix}; or set file_format: {other} if the file is "
        f"{'tab' if other == 'tsv' else 'comma'}-separated"
        + ("" if quoting else ", or quoting: true if its fields are quoted")
        + ("" if header else ", or fill in the first row's missing fields")
    )


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


def merge_tables(tables: list[Table], role: str = "data") -> Table:
    """Several tables as one: the union of their columns (first-seen order), each row with ``None`` in the
    columns its file lacks (a missing value), and ``sources`` naming each row's file. Columns are matched by
    header name, so every file needs a header."""
    if not tables:
        raise DataError(f"the {role} file list is empty; give one file or several")
    if len(tables) == 1:
        return tables[0]
    headless = [str(t.path) for t in tables if not t.has_header]
    if headless:
        raise DataError(f"merging {role} files matches columns by name, but {headless} are read without a header")
    columns: list[str] = []
    for table in tables:
        columns += [c for c in table.columns if c not in columns]
    rows, sources = [], []
    for table in tables:
        position = {c: i for i, c in enumerate(table.columns)}
        for row in table.rows:
            rows.append([row[position[c]] if c in position and position[c] < len(row) else None for c in columns])
            sources.append(table.path)
    name = Path(" + ".join(str(t.path) for t in tables))
    return Table(name, columns, rows, True, sources)
