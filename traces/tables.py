"""Read request tables into one tidy form, refusing bad input by file, line and problem.

The tidy form is a DataFrame with `arrival_s` (float seconds), `prompt_tokens` and `output_tokens`
(int64, at least 1). Formats (`FORMATS`), told apart by the file's extension and then its columns, or
named with `trace_format`:

    tidy      CSV or JSONL with those columns (arrival_s optional: without it every request arrives at 0)
    azure     the Azure LLM inference trace's CSV: TIMESTAMP (date and time), ContextTokens, GeneratedTokens
    vidur     Vidur's trace CSV: arrived_at (seconds), num_prefill_tokens, num_decode_tokens
    sharegpt  ShareGPT-format JSON (vLLM's benchmark datasets): conversations, counted in tokens (sharegpt.py)

A `.csv`, `.jsonl` or `.json` file is read as its extension says; a file with another extension as its
first character says (`[` a JSON array, `{` JSONL, anything else CSV). Files are UTF-8 (a byte-order mark,
as spreadsheets write, is skipped). A tidy file has no columns but its own: with `arrival_s` optional, a
misspelt one would otherwise be dropped unseen and every request sent at 0 (Azure and Vidur files may carry
more columns of their sources, unread). Errors name the file's own columns.

Lengths are at most MAX_TOKENS and arrivals at most MAX_ARRIVAL_S, see there.
"""
from __future__ import annotations

import codecs
import csv
import io
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
# Far beyond any model's context, and small enough that the bytes of a request's KV cache (tokens × the
# bytes of a token, up to a few MB) and sums of them over a run stay exact integers.
MAX_TOKENS = 10**9
# About 32 years. A float's spacing at 1e9 is 0.12 µs and grows with the number: beyond this, the latencies
# added to an arrival would be lost to rounding (at 1e300 s they vanish whole).
MAX_ARRIVAL_S = 1e9


class TraceError(ValueError):
    """A trace file (built-in or user-supplied) cannot be used as it is."""


def read_table(path: str | Path, trace_format: str = "auto") -> pd.DataFrame:
    """The file's requests in the tidy form; `trace_format` one of FORMATS, or "auto" to tell by the file."""
    path = Path(path)
    if trace_format not in ("auto", *FORMATS):
        raise TraceError(f"unknown trace format '{trace_format}' (known: auto, {', '.join(FORMATS)})")
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    text = _text(path)
    container = _container(path, text, trace_format)
    if container == "json":
        try:
            columns, lines = read_sharegpt(text)
        except ShareGPTError as e:
            raise TraceError(f"{path}{'' if e.line is None else f', line {e.line}'}: {e.problem}") from None
        if not lines:
            raise TraceError(f"{path}: no requests in the file (no conversation has a human turn followed by a "
                             f"gpt turn, both non-empty)")
    else:
        columns, lines = _read_jsonl(text, path) if container == "jsonl" else _read_csv(text, path)
        if not lines:
            raise TraceError(f"{path}: no requests in the file")
    names = LAYOUTS[_layout(columns, trace_format, path)]
    arrival = columns.get(names["arrival_s"])
    if names is LAYOUTS["azure"]:
        assert arrival is not None  # the Azure layout is recognised by its timestamp column
        seconds = _timestamps(arrival, lines, path)
    else:
        seconds = np.zeros(len(lines)) if arrival is None else _seconds(arrival, lines, path, names["arrival_s"])
    if arrival is not None:
        _check_bounded(seconds, arrival, lines, path, names["arrival_s"])
    _check_sorted(seconds, lines, path)
    return pd.DataFrame({
        "arrival_s": seconds,
        "prompt_tokens": _counts(columns[names["prompt_tokens"]], lines, path, names["prompt_tokens"]),
        "output_tokens": _counts(columns[names["output_tokens"]], lines, path, names["output_tokens"]),
    })


def _text(path: Path) -> str:
    """The file's text, decoded as UTF-8 after any byte-order mark; refused at the line of a byte that is not."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TraceError(f"{path}, line {line}: byte 0x{data[e.start]:02x} is not UTF-8 text (save the file as "
                         f"UTF-8)") from None


def _container(path: Path, text: str, trace_format: str) -> str:
    """"csv", "jsonl" or "json": by the format (ShareGPT is JSON), the extension, else the first character."""
    if trace_format == "sharegpt":
        return "json"
    kind = {".csv": "csv", ".jsonl": "jsonl", ".json": "json"}.get(path.suffix)
    if kind is None:
        kind = {"[": "json", "{": "jsonl"}.get(text.lstrip()[:1], "csv")
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
    unknown = [name for name in columns if name not in LAYOUTS[trace_format].values()]
    if optional and unknown:
        raise TraceError(f"{path}: unknown column '{unknown[0]}' (a {trace_format} file has arrival_s (optional), "
                         f"prompt_tokens, output_tokens; an Azure trace {', '.join(LAYOUTS['azure'].values())}; "
                         f"a Vidur trace {', '.join(LAYOUTS['vidur'].values())})")
    return trace_format


def _read_csv(text: str, path: Path) -> tuple[dict[str, list], list[int]]:
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return {}, []
        header = [h.strip() for h in header]
        twice = next((h for k, h in enumerate(header) if h in header[:k]), None)
        if twice is not None:
            raise TraceError(f"{path}, line {reader.line_num}: column '{twice}' appears twice in the header")
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


def _read_jsonl(text: str, path: Path) -> tuple[dict[str, list], list[int]]:
    records, lines = [], []
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
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
    boolean = np.array([isinstance(v, bool) for v in values])  # JSON's true would count as 1
    i = _first_bad(~np.isfinite(numbers) | boolean)
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
    i = _first_bad(numbers > MAX_TOKENS)
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: {name} = {values[i]!r} is more than {MAX_TOKENS:,} tokens")
    return numbers.astype(np.int64)


def _seconds(values: list, lines: list[int], path: Path, name: str) -> np.ndarray:
    seconds = _numbers(values, lines, path, name)
    i = _first_bad(seconds < 0)
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: {name} = {values[i]!r} is negative")
    return seconds


def _check_bounded(seconds: np.ndarray, values: list, lines: list[int], path: Path, name: str) -> None:
    i = _first_bad(seconds > MAX_ARRIVAL_S)
    if i is not None:
        raise TraceError(f"{path}, line {lines[i]}: {name} = {values[i]!r} is later than {MAX_ARRIVAL_S:,.0f} s "
                         f"(32 years), where float rounding would lose the latencies added to an arrival")


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
