"""Declarative TOML → dataclass parsing for the catalogs, with errors that name the file and field.

Catalog files are written in the units people read in datasheets (GiB, GB/s, TFLOP/s, µs); each
dataclass field declares its TOML key and scale, and is stored in SI units (bytes, bytes/s, FLOP/s,
seconds) so that no other module ever converts units.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Mapping, TypeVar, cast

GiB = 1024**3

# Datasheet unit → SI. Division for µs keeps 10 µs == 1e-5 s exactly.
UNITS = {
    "": lambda x: x,
    "GiB": lambda x: x * GiB,
    "GB/s": lambda x: x * 1e9,
    "TFLOP/s": lambda x: x * 1e12,
    "us": lambda x: x / 1e6,
}

# The largest number a catalog field may hold, in the unit it is written in. The largest real figures are
# thousands (TB/s of HBM in GB/s, dense TFLOP/s, GiB) to millions (a context in tokens); test systems that
# stand for "free" write 1e12 GB/s and TFLOP/s. Above this a number is a slip (a unit's prefix twice, an
# exponent's typo), and infinity makes times of 0 or inf that no event order survives.
MAX_VALUE = 1e15

T = TypeVar("T")


class CatalogError(ValueError):
    """A catalog entry (built-in or user-supplied) is missing, malformed or out of range."""


def quantity(key: str, unit: str = "", *, whole: bool = False, positive: bool = True,
             at_most: float | None = None, default: Any = dataclasses.MISSING) -> Any:
    """A numeric field read from TOML key `key`, written in `unit` (a key of UNITS); required unless it
    has a `default` (stored as given, in SI units), which lets a section grow without breaking files.

    `positive` refuses zero as well as negatives; `at_most` bounds the TOML value (e.g. 1 for an
    efficiency fraction); `whole` requires a whole number (a count). A field annotated `int`
    (bytes, counts) is stored rounded to an int, any other as a float.
    """
    return dataclasses.field(default=default, metadata=dict(key=key, unit=UNITS[unit], whole=whole,
                                                            positive=positive, at_most=at_most))


def curve(key: str, unit: str) -> Any:
    """An optional measured curve: a TOML array of [count, value] pairs, counts whole, at least 1 and
    rising, values non-negative in `unit`; stored as a tuple of (count, SI value) pairs, () if absent."""
    return dataclasses.field(default=(), metadata=dict(key=key, unit=UNITS[unit], curve=True))


def text(key: str, choices: tuple[str, ...] | None = None, default: Any = dataclasses.MISSING) -> Any:
    """A string field, optionally restricted to `choices`; required unless it has a `default`."""
    return dataclasses.field(default=default, metadata=dict(key=key, choices=choices))


def flag(key: str, default: Any = dataclasses.MISSING) -> Any:
    """A boolean field, required unless it has a `default`."""
    return dataclasses.field(default=default, metadata=dict(key=key, boolean=True))


def section(key: str, cls: type) -> Any:
    """A required sub-table parsed into dataclass `cls`."""
    return dataclasses.field(metadata=dict(key=key, section=cls))


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: not valid TOML: {e}") from None


def parse(cls: type[T], table: Any, path: Path, prefix: str = "", **given: Any) -> T:
    """Build dataclass `cls` from a TOML table; `given` supplies fields not read from the file."""
    where = f"{prefix}." if prefix else ""
    if not isinstance(table, dict):
        raise CatalogError(f"{path}: '{prefix}' must be a table")
    fields = [f for f in dataclasses.fields(cast(Any, cls)) if f.name not in given]
    known = {f.metadata["key"] for f in fields}
    unknown = sorted(k for k in table if k not in known)
    if unknown:
        raise CatalogError(f"{path}: unknown field '{where}{unknown[0]}' (known: {', '.join(sorted(known))})")
    values = dict(given)
    for f in fields:
        key = f.metadata["key"]
        if key not in table:
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
                continue
            raise CatalogError(f"{path}: missing field '{where}{key}'")
        if "section" in f.metadata:
            values[f.name] = parse(f.metadata["section"], table[key], path, where + key)
            continue
        value = _convert(table[key], f.metadata, path, where + key)
        values[f.name] = round(value) if f.type in ("int", int) else value
    return cls(**values)


def _convert(raw: Any, meta: Mapping, path: Path, name: str) -> Any:
    if meta.get("curve"):
        return _curve(raw, meta["unit"], path, name)
    if meta.get("boolean"):
        if not isinstance(raw, bool):
            raise CatalogError(f"{path}: field '{name}' must be true or false, not {raw!r}")
        return raw
    if "choices" in meta:
        if not isinstance(raw, str) or (meta["choices"] and raw not in meta["choices"]):
            allowed = f"one of {', '.join(meta['choices'])}" if meta["choices"] else "a string"
            raise CatalogError(f"{path}: field '{name}' must be {allowed}, not {raw!r}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise CatalogError(f"{path}: field '{name}' must be a number, not {raw!r}")
    if raw != raw:  # NaN
        raise CatalogError(f"{path}: field '{name}' must be a number, not nan")
    if raw > MAX_VALUE:  # inf too
        raise CatalogError(f"{path}: field '{name}' must be at most {MAX_VALUE:g}, a finite number (got {raw})")
    if raw < 0:
        raise CatalogError(f"{path}: field '{name}' must not be negative (got {raw})")
    if meta["positive"] and raw == 0:
        raise CatalogError(f"{path}: field '{name}' must be positive (got 0)")
    if meta["at_most"] is not None and raw > meta["at_most"]:
        raise CatalogError(f"{path}: field '{name}' must be at most {meta['at_most']} (got {raw})")
    if meta["whole"] and raw != int(raw):
        raise CatalogError(f"{path}: field '{name}' must be a whole number (got {raw})")
    return meta["unit"](raw)


def resolve(name_or_path: str | Path, catalog_dir: Path, what: str, other: str = "the path of a .toml file") -> Path:
    """A catalog name (`gh200-96g`) or a path to a user's TOML file; `other` says what else may be given."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise CatalogError(f"{path}: no such {what} file")
        return path
    candidate = catalog_dir / f"{name_or_path}.toml"
    if not candidate.is_file():
        raise CatalogError(f"unknown {what} '{name_or_path}' (known: {', '.join(names(catalog_dir))}; "
                           f"or give {other})")
    return candidate


def names(catalog_dir: Path) -> list[str]:
    return sorted(p.stem for p in catalog_dir.glob("*.toml"))


def _curve(raw: Any, unit, path: Path, name: str) -> tuple[tuple[int, float], ...]:
    def bad(problem: str) -> CatalogError:
        return CatalogError(f"{path}: field '{name}' must be a list of [count, value] pairs {problem}")

    if not isinstance(raw, list) or len(raw) < 2:
        raise bad("(two at least)")
    points: list[tuple[int, float]] = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in pair)):
            raise bad(f"of numbers, not {pair!r}")
        if any(v > MAX_VALUE for v in pair):  # inf too
            raise bad(f"of numbers at most {MAX_VALUE:g}, finite, not {pair!r}")
        count, value = pair
        if count != int(count) or count < 1 or value < 0:
            raise bad(f"with whole counts of at least 1 and non-negative values, not {pair!r}")
        if points and count <= points[-1][0]:
            raise bad(f"with rising counts ({points[-1][0]} then {int(count)})")
        points.append((int(count), unit(value)))
    return tuple(points)
