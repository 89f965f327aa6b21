"""What every step is given (`Context`) and gives back (`Result`), and the two ways it writes figures:
a CSV file in the output folder and a markdown table for the summary."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK, FAILED, ERROR, SKIPPED, TIMEOUT = "ok", "FAILED", "ERROR", "skipped", "TIMEOUT"


@dataclass(frozen=True)
class Context:
    """The check's settings as the steps read them (passed to each step's process as JSON)."""
    out: str                 # the output folder
    device: str              # "cuda" or "cpu"
    quick: bool
    model: str               # the overlap step's model (catalog name or TOML)
    serving_model: str       # calibrate's and validate's
    hw: str                  # the catalog entry measured figures are compared with
    machine: dict = field(default_factory=dict)  # probe.py's facts about the machine

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def folder(self) -> Path:
        return Path(self.out)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Context:
        return cls(**json.loads(text))


@dataclass
class Result:
    """What a step reports: its status, a line saying why (a failure, a skip), its summary section (markdown
    lines) and the files it wrote (relative to the output folder)."""
    status: str
    note: str = ""
    markdown: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def write_rows(path: Path, rows: list[dict]) -> str:
    """`rows` (dicts with the same keys) as a CSV file; returns its name for `Result.files`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return path.name


def _cell(value):
    return format(value, ".6g") if isinstance(value, float) else value


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table; floats as given by the caller (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def ratio(measured: float, reference: float) -> str:
    """measured / reference as a factor, '-' when there is no reference."""
    return f"{measured / reference:.2f}x" if reference else "-"
