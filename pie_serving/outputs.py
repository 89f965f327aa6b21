"""Outputs that appear whole or not at all, and JSON that any parser reads.

A command writes its files into a temporary folder beside `--out` and moves them into `--out` only when it
has finished: a run that fails, is interrupted or killed leaves `--out` as it was (a killed run may leave
the hidden temporary folder beside it, never a half-written file in it). A `--out` that already holds files
is refused unless the command was given `--force`, which replaces the files the command writes (the ones it
owns) and keeps anything else. JSON is strict: infinity and NaN are written as null (Python's `json` writes
`Infinity`, which JavaScript's JSON.parse and many other readers reject).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Iterator

import numpy as np


class OutputError(ValueError):
    """An output path the command cannot write to as asked (a file where a folder goes, an earlier run)."""


def check_folder(out: Path, force: bool, option: str = "--out") -> None:
    """Refuse `out` if it is a file, or a folder that holds anything and `force` is not given."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out}: is a file, not a folder")
    if not force and out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{option} {out}: the folder is not empty (an earlier run?); give --force to replace "
                          f"the files this command writes, or another {option}")


@contextmanager
def output_folder(out: str | Path, owned: Collection[str], force: bool, last: str | None = None,
                  option: str = "--out") -> Iterator[Path]:
    """A temporary folder beside `out` to write the command's files into; when the block ends without an
    error they replace the entries named in `owned` that `out` holds (the file or folder `last` names moves
    in last, so its presence means the rest is there). Checked before anything runs: `check_folder`."""
    out = Path(out)
    check_folder(out, force, option)
    with _writable(out, option):
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.absolute().name}.", suffix=".partial",
                                        dir=out.absolute().parent))
    os.chmod(partial, 0o777 & ~_umask())  # mkdtemp's folder is private; the published one is as mkdir makes it
    try:
        yield partial
        _publish(partial, out, set(owned), last)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def _writable(out: Path, option: str) -> Iterator[None]:
    """Refuse `out` naming it, as the user gave it, where the block cannot create what goes beside it (a
    read-only or missing place, /proc): the error would name a temporary the user never chose."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"{option} {out}: cannot write there ({e.strerror or e})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(partial: Path, out: Path, owned: set[str], last: str | None) -> None:
    """Move `partial`'s entries into `out` (renames on one file system), first taking out what `out` holds of
    the run's own."""
    if not out.exists():
        os.rename(partial, out)
        return
    new = sorted(p.name for p in partial.iterdir())
    old = [p for p in out.iterdir() if p.name in owned | set(new)]
    trash = Path(tempfile.mkdtemp(prefix=f".{out.absolute().name}.", suffix=".old", dir=out.absolute().parent))
    try:
        for path in sorted(old, key=lambda p: p.name != last):  # the marker of a whole run goes first
            os.rename(path, trash / path.name)
        for name in sorted(new, key=lambda n: n == last):     # and comes back last
            os.rename(partial / name, out / name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def output_files(paths: list[Path], force: bool, option: str = "--out") -> Iterator[list[Path]]:
    """Temporary names beside each of `paths` to write to; each replaces its path when the block ends
    without an error. An existing path is refused unless `force`."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise OutputError(f"{option}: {existing[0]} exists; give --force to replace it")
    for p in paths:
        if p.is_dir():
            raise OutputError(f"{option}: {p} is a folder")
    temporary = [p.with_name(f".{p.name}.partial") for p in paths]
    try:
        for p, tmp in zip(paths, temporary):
            with _writable(p, option):
                p.absolute().parent.mkdir(parents=True, exist_ok=True)
                tmp.touch()
        yield temporary
        for tmp, path in zip(temporary, paths):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            if tmp.exists():  # not there: never made (its folder could not be), or moved in
                tmp.unlink()


def strict(value: Any) -> Any:
    """`value` with every non-finite float (in dicts, lists and tuples) replaced by None, numpy scalars as
    Python's."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def json_text(value: Any, **options) -> str:
    """Strict JSON (`strict`); `options` as json.dumps's."""
    return json.dumps(strict(value), allow_nan=False, **options)
