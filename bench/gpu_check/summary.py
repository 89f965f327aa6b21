"""summary.md: the check's one report (its format: bench/gpu_check/__init__.py)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hwmodels import GiB

from .context import Context, Result, table
from .steps import Step


@dataclass
class Ran:
    """A step as the command ran it: its result, seconds taken and the limit it ran under."""
    step: Step
    result: Result
    seconds: float
    limit_s: float


def render(ctx: Context, command: str, ran: list[Ran], total_s: float, budget_s: float, started: datetime) -> str:
    m = ctx.machine
    device = (f"{m.get('gpu_name')} ({m.get('gpu_memory_bytes', 0) / GiB:.0f} GiB)" if ctx.cuda
              else f"CPU ({m.get('host_cpus')} cores): a dry run on tiny sizes, no figure of a GPU")
    ok = sum(r.result.status in ("ok", "skipped") for r in ran)
    lines = ["# Pie GPU check", "",
             f"- device: {device}; torch {m.get('torch')}, CUDA {m.get('torch_cuda')}; host {m.get('machine')}, "
             f"{m.get('host_memory_bytes', 0) / GiB:.0f} GiB",
             f"- compared with: `{Path(ctx.hw).name}`; overlap model `{Path(ctx.model).name}`, serving model "
             f"`{Path(ctx.serving_model).name}`"
             f"{'; --quick' if ctx.quick else ''}",
             f"- command: `{command}`", f"- started {started:%Y-%m-%d %H:%M} UTC, took {total_s:.0f} s "
             f"(budget {budget_s:.0f} s); {ok} of {len(ran)} steps ok or skipped", "", "## Steps", ""]
    lines += table(["step", "status", "seconds", "expected on one H100 (estimated)", "limit s", "what", "note"],
                   [[r.step.name, r.result.status, f"{r.seconds:.1f}", r.step.estimate_s, f"{r.limit_s:.0f}",
                     r.step.what, r.result.note.replace("|", "/")] for r in ran])
    for r in ran:
        lines += ["", f"## {r.step.name}", ""]
        if r.result.status != "ok":
            lines += [f"**{r.result.status}**: {r.result.note}", ""]
        lines += r.result.markdown
        if r.result.files:
            lines += ["", "Files: " + ", ".join(f"`{name}`" for name in r.result.files)]
    return "\n".join(lines) + "\n"


def started_now() -> datetime:
    return datetime.now(timezone.utc)
