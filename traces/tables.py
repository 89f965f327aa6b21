"""Read request tables (CSV or JSONL) into one tidy form, refusing bad input by file, line and problem.

The tidy form is a DataFrame with `arrival_s` (float seconds), `prompt_tokens` and `output_tokens`
(int64, at least 1). Files may use these column names (arrival_s optional: without it every request
arrives at 0), or the Azure LLM inference trace's `TIMESTAMP, ContextTokens, GeneratedTokens`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
AZURE_COLUMNS = {"TIMESTAMP": "arrival_s", "ContextTokens": "prompt_tokens", "GeneratedTokens": "output_tokens"}


class TraceError(ValueError):
    """A trace file (built-in or user-supplied) cannot be used as it is."""


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        columns, lines = _read_jsonl(path)
    elif path.suffix == ".csv":
        columns, lines = _read_csv(path)
    else:
        raise TraceError(f"{path}: unknown format '{path.suffix}' (use .csv or .jsonl)")
    if not lines:
        raise TraceError(f"{path}: no requests in the file")
    if set(AZURE_COLUMNS) <= set(columns):
        columns = {AZURE_COLUMNS[k]: v for k, v in columns.items() if k in AZURE_COLUMNS}
        arrival = _timestamps(columns["arrival_s"], lines, path)
    else:
        for name in ("prompt_tokens", "output_tokens"):
            if name not in columns:
                raise TraceError(f"{path}: missing column '{name}' (have: {', '.join(columns) or 'none'}; "
                                 f"need {', '.join(COLUMNS)}, arrival_s optional)")
        raw_arrival = columns.get("arrival_s")
        arrival = np.zeros(len(lines)) if raw_arrival is None else _seconds(raw_arrival, lines, path)
    _check_sorted(arrival, lines, path)
    return pd.DataFrame({
        "arrival_s": arrival,
        "prompt_tokens": _counts(columns["prompt_tokens"], lines, path, "prompt_tokens"),
        "output_tokens": _counts(columns["output_tokens"], lines, path, "output_tokens"),
    })


def _read_csv(path: Path) -> tuple[dict[str, list], list[int]]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return {}, []
        header = [h.strip() for h in header]
        columns: dict[str, list] = {h: [] for h in header}
        lines = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise TraceError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            for h, value in zip(header, row):
                columns[h].append(value.strip())
            lines.append(reader.line_num)
    return columns, lines


def _read_jsonl(path: Path) -> tuple[dict[str, list], list[int]]:
    records, lines = [], []
    with open(path) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TraceError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
            lines.append(number)
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        missing = next((line for r, line in zip(records, lines) if name not in r), None)
        if missing is not None and name in COLUMNS:
            raise TraceError(f"{path}, line {missing}: missing field '{name}'")
        columns[name] = [r.get(name) for r in records]
    return columns, lines


def _first_bad(bad: np.ndarray) -> int | None:
    index = np.flatnonzero(bad)
    return int(index[0]) if index.size else None


def _numbers(values: list, lines: list[int], path: Path, name: str) -> np.ndarray:
    numbers = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    i = _first_bad(~np.isfinite(numbers))
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: {name} = {values[i]!r} is not a number")
    return numbers


def _counts(values: list, lines: list[int], path: Path, name: str) -> np.ndarray:
    numbers = _numbers(values, lines, path, name)
    i = _first_bad(numbers != np.round(numbers))
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: {name} = {values[i]!r} is not a whole number of tokens")
    i = _first_bad(numbers < 1)
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: {name} = {values[i]!r} must be at least 1 token")
    return numbers.astype(np.int64)


def _seconds(values: list, lines: list[int], path: Path) -> np.ndarray:
    seconds = _numbers(values, lines, path, "arrival_s")
    i = _first_bad(seconds < 0)
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: arrival_s = {values[i]!r} is negative")
    return seconds


def _timestamps(values: list, lines: list[int], path: Path) -> np.ndarray:
    """Wall-clock timestamps → seconds since the first request."""
    stamps = pd.to_datetime(pd.Series(values, dtype=object), format="ISO8601", errors="coerce")
    i = _first_bad(stamps.isna().to_numpy())
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: TIMESTAMP = {values[i]!r} is not a date and time")
    return (stamps - stamps.iloc[0]).dt.total_seconds().to_numpy()


def _check_sorted(arrival: np.ndarray, lines: list[int], path: Path) -> None:
    i = _first_bad(np.diff(arrival) < 0)
    if i is not None:
        raise TraceError(f"{path}, line {lines[i + 1]}: arrival goes back in time "
                         f"(before line {lines[i]}); requests must be sorted by arrival")
