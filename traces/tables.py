"""Read request tables into one tidy form, refusing bad input by file, line and problem.

The tidy form is a DataFrame with `arrival_s` (float seconds), `prompt_tokens` and `output_tokens`
(int64, at least 1). Formats (`FORMATS`), told apart by the file's extension and then its columns, or
named with `trace_format`:

    tidy      CSV or JSONL with those columns (arrival_s optional: without it every request arrives at 0)
    azure     the Azure LLM inference trace's CSV: TIMESTAMP (date and time), ContextTokens, GeneratedTokens
    vidur     Vidur's trace CSV: arrived_at (seconds), num_prefill_tokens, num_decode_tokens
    sharegpt  ShareGPT-format JSON (vLLM's benchmark datasets): conversations, counted in tokens (sharegpt.py)

A `.csv`, `.jsonl` or `.json` file is read as its extension says; a file with another extension as its
first character says (`[` a JSON array, `{` JSONL, anything else CSV). Errors name the file's own columns.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd

from .sharegpt import ShareGPTError, read_sharegpt

COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
FORMATS = ("tidy", "azure", "vidur", "sharegpt")
# Each table format's names of the tidy columns.
LAYOUTS = {
    "tidy": dict(zip(COLUMNS, COLUMNS)),
    "azure": {"arrival_s": "TIMESTAMP", "prompt_tokens": "ContextTokens", "output_tokens": "GeneratedTokens"},
    "vidur": {"arrival_s": "arrived_at", "prompt_tokens": "num_prefill_tokens", "output_tokens": "num_decode_tokens"},
}
LAYOUTS["sharegpt"] = LAYOUTS["tidy"]
KNOWN_COLUMNS = {name for layout in LAYOUTS.values() for name in layout.values()}


class TraceError(ValueError):
    """A trace file (built-in or user-supplied) cannot be used as it is."""


def read_table(path: str | Path, trace_format: str = "auto") -> pd.DataFrame:
    """The file's requests in the tidy form; `trace_format` one of FORMATS, or "auto" to tell by the file."""
    path = Path(path)
    if trace_format not in ("auto", *FORMATS):
        raise TraceError(f"unknown trace format '{trace_format}' (known: auto, {', '.join(FORMATS)})")
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    container = _container(path, trace_format)
    if container == "json":
        try:
            columns, lines = read_sharegpt(path)
        except ShareGPTError as e:
            raise TraceError(f"{path}{'' if e.line is None else f', line {e.line}'}: {e.problem}") from None
        if not lines:
            raise TraceError(f"{path}: no requests in the file (no conversation has a human turn followed by a "
                             f"gpt turn, both non-empty)")
    else:
        columns, lines = _read_jsonl(path) if container == "jsonl" else _read_csv(path)
        if not lines:
            raise TraceError(f"{path}: no requests in the file")
    names = LAYOUTS[_layout(columns, trace_format, path)]
    arrival = columns.get(names["arrival_s"])
    if names is LAYOUTS["azure"]:
        assert arrival is not None  # the Azure layout is recognised by its timestamp column
        seconds = _timestamps(arrival, lines, path)
    else:
        seconds = np.zeros(len(lines)) if arrival is None else _seconds(arrival, lines, path, names["arrival_s"])
    _check_sorted(seconds, lines, path)
    return pd.DataFrame({
        "arrival_s": seconds,
        "prompt_tokens": _counts(columns[names["prompt_tokens"]], lines, path, names["prompt_tokens"]),
        "output_tokens": _counts(columns[names["output_tokens"]], lines, path, names["output_tokens"]),
    })


def _container(path: Path, trace_format: str) -> str:
    """"csv", "jsonl" or "json": by the format (ShareGPT is JSON), the extension, else the first character."""
    if trace_format == "sharegpt":
        return "json"
    kind = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}.get(path.suffix)
    if kind is None:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.read(4096).lstrip()[:1]
        kind = {"[": "json", "{": "jsonl"}.get(first, "csv")
    if kind == "json" and trace_format != "auto":
        raise TraceError(f"{path}: a JSON array is read as ShareGPT conversations, not as a {trace_format} table "
                         f"(a {trace_format} trace is CSV or JSONL)")
    return kind


def _layout(columns: dict[str, list], trace_format: str, path: Path) -> str:
    """The format whose columns the file has (the one named, which must have them all)."""
    if trace_format == "auto":
        trace_format = next((f for f in ("azure", "vidur") if set(LAYOUTS[f].values()) <= set(columns)), "tidy")
    optional = trace_format in ("tidy", "sharegpt")  # no arrival times: every request at 0
    missing = [name for field, name in LAYOUTS[trace_format].items()
               if name not in columns and not (optional and field == "arrival_s")]
    if missing:
        raise TraceError(f"{path}: missing column '{missing[0]}' (have: {', '.join(columns) or 'none'}; the "
                         f"{trace_format} format has {', '.join(LAYOUTS[trace_format].values())}"
                         f"{', arrival_s optional' if optional else ''})")
    return trace_format


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
        if missing is not None and name in KNOWN_COLUMNS:
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


def _seconds(values: list, lines: list[int], path: Path, name: str) -> np.ndarray:
    seconds = _numbers(values, lines, path, name)
    i = _first_bad(seconds < 0)
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: {name} = {values[i]!r} is negative")
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
