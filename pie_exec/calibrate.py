"""`pie-exec calibrate`: time this machine with the executor's own code and write a hardware profile —
a hardware TOML with a `[fit]` section (hwmodels.profile) — that `pie-sim --hw PROFILE` simulates it with.

What is timed (each point: one warm-up, then the median of `repeats`; the compute points in rounds):
- curves: every layer in turn without its attention at each of a list of token counts, and the LM head
  with sampling at each of a list of sampled-token counts (matrix products of a few rows are far from
  linear in the rows: hwmodels.profile);
- compute: whole iterations through `Executor.execute`, all KV in the device pool, over a grid of decode
  batches (sequences × context), prefill chunks (tokens, with no context and with the longest) and one
  mixed batch; each gives the mean time of a layer and the time outside the layers (the "head");
- contention: the widest decode batch at a middle context again, while the copier keeps copying host→device;
- copies: the executor's copier (a thread on the CPU, one stream a direction on CUDA) moving layer-KV
  blocks each way, in one call and in a few, a layer's worth of copies (one per layer) issued
  together and timed on the wall from issue to done, as the engine pays them; then both directions at once;
- issue: what issuing a copy adds to a pass of the layers (the host's work, not the copy's bytes).

Fits (least squares of relative errors, non-negative; `hwmodels.profile.relative_fit`): the curves are
the measured points themselves; layer and head are the iterations' times less their curves' values,
fitted linearly as `hwmodels.profile` describes; copies as calls · latency + bytes / bandwidth per direction, with one
latency for both; bidirectional = both directions' bytes / their wall time; copy slowdown = (contended /
alone − 1) per GB/s of host→device bandwidth; issue cost by absolute NNLS (`_issue_fit`). Memory sizes and the roofline figures are the `--base`
entry's. The profile is written with the fits' residuals in its header, next to a CSV of every point.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.table import Table

from hwmodels import BatchShape, ModelSpec
from hwmodels.hardware import HARDWARE_DIR
from hwmodels.profile import (
    CURVES,
    HEAD_TERMS,
    LAYER_TERMS,
    ComputeFit,
    architecture,
    features,
    interpolate,
    relative_fit,
)
from hwmodels.spec import read_toml, resolve
from pie_policy import Copy, EngineConfig, Plan
from pie_policy.blocks import GPU, BlockRef
from pie_policy.layerswap import runs
from pie_policy.plan import D2H, H2D, LAYER_KV, SeqWork
from pie_serving.options import positive_int
from pie_serving.outputs import output_files

from .engine import Executor, device_clock

GB = 1e9
SUSPECT_ERROR = 0.25  # a fit this far from a point it fitted is worth a warning (a busy machine, too few repeats)
RUNS = 4  # calls of the multi-call copies timed: layer copies of OPT-125M on azure-conv have 1-10, mostly 1-5


@dataclass
class Point:
    """One timed configuration: what it measures, its shape or copy size, measured and fitted seconds."""
    fit: str                     # dense, lm_head (curves); layer, head, copy, bidirectional, issue or contended (fits)
    label: str
    measured: float
    shape: BatchShape = BatchShape()
    calls: int = 0
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    fitted: float = math.nan

    @property
    def error(self) -> float:
        """fitted / measured - 1; nan for a measured difference at or below zero (an issue point on a GPU)."""
        return self.fitted / self.measured - 1 if self.measured > 0 else math.nan


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...] = (1, 4, 16)
    contexts: tuple[int, ...] = (64, 256, 1024)
    prefills: tuple[int, ...] = (32, 128, 512, 2048)  # up to the engine's token budget: no extrapolation
    copy_blocks: tuple[int, ...] = (1, 16, 64, 256)  # what layer copies move (blocks of one layer)
    # Curves' counts: every count up to 16, where the BLAS switches kernels (decode batches), then sparser.
    tokens: tuple[int, ...] = (*range(1, 17), 24, 32, 48, 64, 128, 256, 512, 1024, 2048)
    sampled: tuple[int, ...] = (*range(1, 17), 24, 32, 64, 128, 256)
    repeats: int = 5

    def batches_of(self, max_context: int) -> list[tuple[str, list, list]]:
        """(label, prefills as (new, cached), decode contexts) of every compute point."""
        if max(self.contexts) >= max_context or max(self.prefills) > max_context:
            raise ValueError(f"--contexts must stay below and --prefills within the model's context of "
                             f"{max_context} tokens")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}")
        if min(len(set(self.tokens)), len(set(self.sampled))) < 2:
            raise ValueError("--tokens and --sampled need two counts at least (the curves interpolate)")
        points = [(f"decode {b} x {c}", [], [c] * b) for b in self.batches for c in self.contexts]
        longest = max(self.contexts)
        points += [(f"prefill {n} at {cached}", [(n, cached)], []) for n in self.prefills for cached in (0, longest)
                   if n + cached <= max_context]
        n, b, c = (sorted(v)[len(v) // 2] for v in (self.prefills, self.batches, self.contexts))
        points.append((f"prefill {n} + decode {b} x {c}", [(n, 0)], [c] * b))
        # Mixed lengths, where padding to the longest costs more than the tokens attended (BatchShape).
        short = min(self.contexts)
        points += [(f"decode {b - 1} x {short} + 1 x {longest}", [], [short] * (b - 1) + [longest])
                   for b in self.batches if b > 1]
        few, most = min(self.prefills), max(self.prefills)
        if few < most:
            points.append((f"prefills {most} + {few}", [(most, 0), (few, 0)], []))
        return points


def _sizes(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive whole numbers."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"must be positive whole numbers separated by commas, got {text!r}")
    return sizes


GRID_OPTIONS = {"batches": "decode batch sizes", "contexts": "decode contexts; the longest is also a prefill's",
                "prefills": "prefill chunk sizes", "copy_blocks": "KV blocks per timed copy",
                "tokens": "token counts of a layer without attention", "sampled": "sampled-token counts of the LM head"}


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    default = Grid()
    for name, what in GRID_OPTIONS.items():
        sizes = getattr(default, name)
        parser.add_argument("--" + name.replace("_", "-"), type=_sizes, default=sizes,
                            help=f"{what} (default {','.join(map(str, sizes))})")
    parser.add_argument("--repeats", type=positive_int, default=default.repeats,
                        help="timed repeats of each point (median)")


def grid_from(args: argparse.Namespace) -> Grid:
    return Grid(**{name: getattr(args, name) for name in (*GRID_OPTIONS, "repeats")})


def plan_of(prefills: list, decodes: list, block_size: int) -> Plan:
    """A one-iteration plan with every block in the device pool, sequences' blocks numbered in turn."""
    seqs, slot = [], 0
    for new, cached in [*prefills, *((1, c) for c in decodes)]:
        blocks = -(-(new + cached) // block_size)
        seqs.append(SeqWork(len(seqs), new, cached, True, tuple(BlockRef(GPU, slot + i) for i in range(blocks))))
        slot += blocks
    return Plan(0, tuple(seqs), BatchShape.of(prefills, decodes))


def _without_attention(q, k, v):
    return q


def blocks_needed(plan: Plan) -> int:
    return sum(len(s.blocks) for s in plan.seqs)


class Calibration:
    """The timed points of one model on one device, gathered step by step, then fitted."""

    def __init__(self, model, spec: ModelSpec, device: torch.device, grid: Grid, block_size: int = 16):
        self.model, self.spec, self.device, self.grid = model, spec, device, grid
        self.block_size, self.cuda, self.clock = block_size, device.type == "cuda", device_clock(device)
        self.block_bytes = block_size * spec.kv_bytes_per_token_layer  # one block of one layer
        self.points: list[Point] = []
        self.copies_per_point = spec.num_layers
        self._op = 0

    def _executor(self, num_layers: int, gpu_blocks: int, cpu_blocks: int, staging_slots: int) -> Executor:
        config = EngineConfig(num_layers=num_layers, block_bytes_layer=self.block_bytes, num_gpu_blocks=gpu_blocks,
                              num_cpu_blocks=cpu_blocks, block_size=self.block_size)
        return Executor(self.model, config, self.device, staging_slots)

    def _interleaved(self, jobs: list[tuple[list[Point], Callable[[], tuple[float, ...]]]]) -> None:
        """Time `jobs` (points, and a timer giving one sample of each point's seconds) in rounds, every job
        once a round: one warm-up round, then `repeats`; each point is the median of its samples. A
        shared VM drifts by 5-15% in minutes: timed one after the other, the points timed during a slow
        minute would be slow against the rest and bend the fits, while rounds spread every slow minute
        over all of them. It is also how serving runs them: another batch in between, not the same one
        again and again."""
        samples: list[list[tuple[float, ...]]] = [[] for _ in jobs]
        for _ in range(self.grid.repeats + 1):
            for taken, (_, timer) in zip(samples, jobs):
                taken.append(timer())
        for taken, (points, _) in zip(samples, jobs):
            for i, point in enumerate(points):
                point.measured = statistics.median(sample[i] for sample in taken[1:])
            self.points += points

    def _seconds(self, work: Callable[[], None]) -> float:
        """Seconds `work` takes on the device's clock (on a GPU, its work is waited for afterwards)."""
        start = self.clock.mark()
        work()
        end = self.clock.mark()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return self.clock.seconds(start, end)

    # ---- compute
    def _curve_jobs(self) -> list[tuple[list[Point], Callable[[], tuple[float]]]]:
        """A layer without its attention at each of the grid's token counts, every layer in turn (as an
        iteration runs them: one layer's weights alone would stay in the CPU's cache), and the LM head with
        greedy sampling, as the engine's last stage runs it, at each of its sampled-token counts."""
        hidden, dtype = self.spec.hidden_size, next(self.model.parameters()).dtype

        def timer(work, per: int = 1):
            @torch.inference_mode()
            def sample() -> tuple[float]:
                return (self._seconds(work) / per,)
            return sample

        jobs = []
        for tokens in sorted(set(self.grid.tokens)):
            h = torch.randn(tokens, hidden, dtype=dtype, device=self.device)
            positions = torch.zeros(tokens, dtype=torch.long, device=self.device)
            jobs.append(([Point("dense", f"a layer without attention at {tokens} tokens", math.nan,
                                BatchShape(prefill_tokens=tokens))],
                         timer(lambda h=h, positions=positions: self._dense_pass(h, positions), self.spec.num_layers)))
        for sampled in sorted(set(self.grid.sampled)):
            h = torch.randn(sampled, hidden, dtype=dtype, device=self.device)
            jobs.append(([Point("lm_head", f"LM head and sampling of {sampled} tokens", math.nan,
                                BatchShape(sampled_tokens=sampled))],
                         timer(lambda h=h: self.model.logits(h).argmax(dim=-1).tolist())))
        return jobs

    def _dense_pass(self, h: torch.Tensor, positions: torch.Tensor, after_layer=None) -> None:
        """Every layer without its attention (which `_iteration` times with the rest), in turn;
        `after_layer(layer)` is called after each."""
        for layer, block in enumerate(self.model.layers):
            h = block(h, positions, _without_attention)
            if after_layer:
                after_layer(layer)

    def curve(self, kind: str) -> tuple[tuple[int, float], ...]:
        """The measured (count, seconds) points of curve `kind` (a key of CURVES)."""
        return tuple(sorted((getattr(p.shape, CURVES[kind]), p.measured) for p in self.points if p.fit == kind))

    def _iteration(self, executor: Executor, plan: Plan, during=None) -> tuple[float, float]:
        """Seconds of a layer (the mean) and of the rest of one iteration of `plan`; `during()` runs before
        it and returns a callable run after it (to keep the copier busy meanwhile)."""
        after = during() if during else None
        stats, _, _ = executor.execute(plan, [[0] * s.new_tokens for s in plan.seqs], 0.0)
        if after:
            after()
        compute = sum(stats.layer_compute_s)
        return compute / len(stats.layer_compute_s), stats.end_s - stats.start_s - compute - stats.stall_s

    def time_compute(self) -> None:
        """The curves and whole iterations over the grid, interleaved."""
        specs = self.grid.batches_of(self.spec.max_context)
        plans = [(label, plan_of(p, d, self.block_size)) for label, p, d in specs]
        executor = self._executor(self.spec.num_layers, max(blocks_needed(p) for _, p in plans), 0, 0)
        try:
            self._interleaved(self._curve_jobs() + [
                ([Point("layer", label, math.nan, plan.shape), Point("head", label, math.nan, plan.shape)],
                 lambda plan=plan: self._iteration(executor, plan)) for label, plan in plans])
        finally:
            executor.close()

    # ---- copies
    def _copy(self, direction: str, first: int, blocks: int, calls: int = 1, layer: int = 0) -> Copy:
        """`blocks` blocks of `layer` from row `first` in `calls` runs (one call each) a row apart."""
        pairs = tuple((first + i + i * calls // blocks,) * 2 for i in range(blocks))
        return self._fresh(Copy(0, direction, LAYER_KV, layer, pairs, blocks * self.block_bytes,
                                len(runs(pairs)), (), 0))

    def _fresh(self, copy: Copy) -> Copy:
        """`copy` again under a new id (the copier tracks copies by id)."""
        self._op += 1
        return dataclasses.replace(copy, op_id=self._op)

    def _finish(self, executor: Executor, copies: list[Copy]) -> None:
        executor.copier.wait([c.op_id for c in copies])
        if self.cuda:  # CudaCopier.wait only orders the compute stream
            torch.cuda.synchronize(self.device)

    def _run_copies(self, executor: Executor, copies: list[Copy]) -> float:
        """Wall seconds to run `copies` issued together."""
        start = time.perf_counter()
        executor._issue(copies)
        self._finish(executor, copies)
        return time.perf_counter() - start

    def time_copies(self) -> None:
        """Each direction in one call and in `RUNS`, a layer's worth of copies at a time (one per layer, as
        a plan issues them, so that a source is not still in the CPU's cache from the last copy); then both
        at once (the largest, half each). Timed on the wall from the first issue to the last done: what the
        executor pays, the copier's per-copy handoff (queue, thread wake-up, GIL) included — its own busy
        clock leaves that out. The handoff has no term of its own in the simulator: the fit spreads it over
        the calls of copies of 1 and `RUNS` calls, the range layer copies have (their blocks' runs). Last,
        what issuing a copy costs the layers (`_issue_job`), interleaved with the rest."""
        sizes = sorted(self.grid.copy_blocks)
        n = self.copies_per_point
        executor = self._executor(n, 1, max(sizes[-1] + RUNS, 4 * RUNS), 1)

        def layer_copies(copy: Copy) -> tuple[float]:
            return (self._run_copies(executor, [self._fresh(dataclasses.replace(copy, layer=layer))
                                                for layer in range(n)]),)
        jobs = []
        for direction in (H2D, D2H):
            for blocks, calls in [(b, 1) for b in sizes] + [(b, RUNS) for b in sizes if b >= RUNS]:
                copy = self._copy(direction, 0, blocks, calls)
                jobs.append(([Point("copy", f"{direction} {n} x {blocks} blocks in {copy.calls} calls", math.nan,
                                    calls=n * copy.calls, **{f"bytes_{direction}": n * copy.nbytes})],
                             lambda copy=copy: layer_copies(copy)))
        half = max(1, sizes[-1] // 2)
        jobs.append(([Point("bidirectional", f"h2d and d2h {half} blocks each at once", math.nan, calls=2,
                            bytes_h2d=half * self.block_bytes, bytes_d2h=half * self.block_bytes)],
                     lambda: (self._run_copies(executor, [self._copy(H2D, 0, half, 1),
                                                          self._copy(D2H, half, half, 1)]),)))
        jobs += [self._issue_job(executor, calls) for calls in (1, RUNS, 2 * RUNS)]
        try:
            self._interleaved(jobs)
        finally:
            executor.close()

    def _issue_job(self, executor: Executor, calls: int) -> tuple[list[Point], Callable[[], tuple[float]]]:
        """What issuing a copy of `calls` one-block runs adds to the compute clock: a pass of the layers at
        the grid's middle decode batch, plain and with a write-back and a prefetch issued after each layer
        (as layer swapping issues them), timed plain, with, with, plain (a drift over the four cancels).
        The copies are too small for their bytes to count; what is measured is the host's work: on the CPU
        the copier thread waking and taking the GIL from the layers, ~0.1 ms a copy, where issuing them
        alone takes ~0.02."""
        tokens = sorted(self.grid.batches)[len(self.grid.batches) // 2]
        h = torch.randn(tokens, self.spec.hidden_size, dtype=next(self.model.parameters()).dtype, device=self.device)
        positions = torch.zeros(tokens, dtype=torch.long, device=self.device)
        copy = {direction: self._copy(direction, 0, calls, calls) for direction in (D2H, H2D)}

        @torch.inference_mode()
        def one_pass(issued: list | None) -> float:
            def issue(layer: int) -> None:
                pair = [self._fresh(dataclasses.replace(copy[d], layer=layer)) for d in (D2H, H2D)]
                executor._issue(pair)
                issued.extend(pair)
            return self._seconds(lambda: self._dense_pass(h, positions, None if issued is None else issue))

        def sample() -> tuple[float]:
            issued: list[Copy] = []
            plain = one_pass(None)
            with_copies = one_pass(issued) + one_pass(issued)
            plain += one_pass(None)
            self._finish(executor, issued)
            return ((with_copies - plain) / len(issued),)
        point = Point("issue", f"issue a copy of {calls} calls between layers", math.nan, calls=calls)
        return [point], sample

    def time_contention(self) -> None:
        """The widest decode batch at a middle context while host→device copies run through each iteration
        (enough of them queued for 1.5 times the iteration, at the largest copy's rate)."""
        b, c = max(self.grid.batches), sorted(self.grid.contexts)[len(self.grid.contexts) // 2]
        plan = plan_of([], [c] * b, self.block_size)
        iteration = sum(p.measured * (self.spec.num_layers if p.fit == "layer" else 1) for p in self.points
                        if p.fit in ("layer", "head") and p.shape == plan.shape)
        blocks = max(self.grid.copy_blocks)
        largest = max((p for p in self.points if p.fit == "copy" and p.bytes_h2d), key=lambda p: p.bytes_h2d)
        count = math.ceil(1.5 * iteration * largest.bytes_h2d / largest.measured / (blocks * self.block_bytes))
        compute = self._executor(self.spec.num_layers, blocks_needed(plan), 0, 0)
        copier = self._executor(1, 1, blocks, 1)

        def during():
            copies = [self._copy(H2D, 0, blocks, 1) for _ in range(count)]
            copier._issue(copies)
            return lambda: self._finish(copier, copies)
        try:
            self._interleaved([([Point("contended", f"decode {b} x {c}, h2d copies in flight", math.nan, plan.shape)],
                                lambda: self._iteration(compute, plan, during))])
        finally:
            compute.close()
            copier.close()

    # ---- fits
    def _issue_fit(self) -> dict[str, float]:
        """`copy_issue` + `copy_issue_per_call` · calls through the issue points (none: no cost), by
        non-negative least squares of absolute errors: the points are differences of two timings, which
        noise can take to zero or below (on a GPU, whose host issues ahead of it, they are noise alone)."""
        from scipy.optimize import nnls  # here: as in `relative_fit`

        points = [p for p in self.points if p.fit == "issue"]
        coefs = (0.0, 0.0)
        if points:
            us, _ = nnls(np.array([[1.0, p.calls] for p in points]), np.array([p.measured * 1e6 for p in points]))
            coefs = tuple(us / 1e6)
        for p in points:
            p.fitted = coefs[0] + coefs[1] * p.calls
        return {"copy_issue": coefs[0], "copy_issue_per_call": coefs[1]}

    def fit(self) -> tuple[ComputeFit, dict]:
        """The `[fit]` section and the measured link figures (bytes/s, seconds); fills in `fitted`."""
        fits = {kind: self.curve(kind) for kind in CURVES}
        for p in self.points:
            if p.fit in CURVES:  # a curve passes through its points
                p.fitted = p.measured
        for kind, terms, curve in (("layer", LAYER_TERMS, "dense"), ("head", HEAD_TERMS, "lm_head")):
            points = [p for p in self.points if p.fit == kind]
            known = [interpolate(fits[curve], getattr(p.shape, CURVES[curve])) for p in points]
            coefs = relative_fit([features(p.shape, terms) for p in points], [p.measured for p in points], known)
            fits.update(zip(terms, coefs))
            for p, curved in zip(points, known):
                p.fitted = curved + float(np.dot(coefs, features(p.shape, terms)))
        copies = [p for p in self.points if p.fit == "copy"]
        latency, per_h2d, per_d2h = relative_fit([[p.calls, p.bytes_h2d, p.bytes_d2h] for p in copies],
                                                 [p.measured for p in copies])
        if per_h2d <= 0 or per_d2h <= 0:
            raise ValueError("copies took no time per byte: give larger --copy-blocks")
        for p in copies:
            p.fitted = p.calls * latency + p.bytes_h2d * per_h2d + p.bytes_d2h * per_d2h
        fits.update(self._issue_fit())
        both = next(p for p in self.points if p.fit == "bidirectional")
        link = {"h2d": 1 / per_h2d, "d2h": 1 / per_d2h, "latency": latency,
                "bidirectional": (both.bytes_h2d + both.bytes_d2h) / max(both.measured - 2 * latency, 1e-9)}
        both.fitted = 2 * latency + (both.bytes_h2d + both.bytes_d2h) / link["bidirectional"]
        fit = ComputeFit(self.spec.name, architecture(self.spec), torch.get_num_threads(), **fits,
                         copy_slowdown_per_gb_s=0.0)
        contended = next((p for p in self.points if p.fit == "contended"), None)
        if contended:
            alone = fit.layer_time(contended.shape)
            slowdown = max(0.0, contended.measured / alone - 1) / (link["h2d"] / GB)
            fit = dataclasses.replace(fit, copy_slowdown_per_gb_s=slowdown)
            contended.fitted = fit.layer_time(contended.shape, link["h2d"])
        return fit, link


def residuals(points: list[Point]) -> dict[str, tuple[float, float, int]]:
    """Per fit: (max |relative error|, mean |relative error|, points); the curves pass through their points."""
    out = {}
    for kind in dict.fromkeys(p.fit for p in points if p.fit not in CURVES):
        errors = [abs(p.error) for p in points if p.fit == kind and not math.isnan(p.error)]
        if errors:
            out[kind] = (max(errors), sum(errors) / len(errors), len(errors))
    return out


def points_table(points: list[Point]) -> Table:
    table = Table("fit", "point", "measured ms", "fitted ms", "error", title="calibration points")
    for p in points:
        table.add_row(p.fit, p.label, f"{p.measured * 1e3:.3f}", f"{p.fitted * 1e3:.3f}",
                      "-" if math.isnan(p.error) else f"{p.error:+.1%}")
    return table


def warnings(points: list[Point]) -> list[str]:
    """A line for each fit whose worst point is off by more than SUSPECT_ERROR."""
    lines = []
    for kind, (worst, _, _) in residuals(points).items():
        if worst > SUSPECT_ERROR:
            point = max((p for p in points if p.fit == kind and not math.isnan(p.error)), key=lambda p: abs(p.error))
            lines.append(f"the {kind} fit is {point.error:+.0%} off at '{point.label}': the machine may have been "
                         f"busy or the point too short; calibrate again on a quiet machine or with more --repeats")
    return lines


def write_points(path: Path, points: list[Point]) -> None:
    shape_fields = [f.name for f in dataclasses.fields(BatchShape)]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["fit", "point", *shape_fields, "calls", "bytes_h2d", "bytes_d2h", "measured_s", "fitted_s",
                      "rel_error"])
        for p in points:
            out.writerow([p.fit, p.label, *(getattr(p.shape, n) for n in shape_fields), p.calls, p.bytes_h2d,
                          p.bytes_d2h, f"{p.measured:.6g}", f"{p.fitted:.6g}", f"{p.error:.4f}"])


def _toml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return format(value, ".6g") if isinstance(value, float) else str(value)


def toml_text(header: list[str], top: dict, tables: dict[str, dict]) -> str:
    lines = [f"# {line}" for line in header]
    lines += [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


def profile_text(base: str, fit: ComputeFit, link: dict, copy_engines: int, header: list[str]) -> str:
    """The profile: `base`'s entry with the measured link and the `[fit]` section."""
    table = read_toml(resolve(base, HARDWARE_DIR, "hardware"))
    table.pop("fit", None)
    table["link"].update(h2d_gb_s=link["h2d"] / GB, d2h_gb_s=link["d2h"] / GB,
                         bidirectional_gb_s=link["bidirectional"] / GB, transfer_latency_us=link["latency"] * 1e6,
                         copy_engines=copy_engines)
    table["fit"] = fit.toml_values()
    top = {"description": f"{table.pop('description')}; calibrated for {fit.model}"}
    return toml_text(header, top, table)


def model_text(spec: ModelSpec, dtype_name: str) -> str:
    """A model TOML of `spec` (whose dtype_bytes is the one calibrated), for `pie-sim --model`."""
    values = {f.metadata["key"]: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.metadata}
    values["description"] = f"{spec.description} in {dtype_name}, as `pie-exec calibrate` timed it"
    return toml_text([f"{spec.name} at {dtype_name}: the model a profile calibrated with it simulates"], values, {})


def header_lines(settings: str, device: torch.device, points: list[Point], csv_name: str) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"Hardware profile measured by `pie-exec calibrate` ({settings})",
             f"on {name}, torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
             "Layer and head times: [fit] (hwmodels/profile.py); link: the executor's copier; memory and",
             "roofline figures: the base entry. Relative errors of the fits (every point in " + csv_name + "):"]
    lines += [f"  {kind}: max {worst:.1%}, mean {mean:.1%} over {n} points"
              for kind, (worst, mean, n) in residuals(points).items()]
    return lines


def calibrate(model, spec: ModelSpec, device: torch.device, grid: Grid, base: str, out: Path, dtype_name: str,
              console, force: bool = False) -> None:
    """Time, fit, print the points and write PROFILE, its points CSV and the model TOML it simulates (all
    three or none; an existing one only with `force`)."""
    started = time.perf_counter()
    points_csv = out.with_suffix(".csv")
    model_toml = out.parent / f"{spec.name}-{dtype_name}.toml"
    with output_files([out, points_csv, model_toml], force) as (out_tmp, points_tmp, model_tmp):
        fit, link, points = _calibrate(model, spec, device, grid, console)
        write_points(points_tmp, points)
        model_tmp.write_text(model_text(spec, dtype_name))
        settings = f"{spec.name} {dtype_name} on {device.type}, base {base}, {grid}"
        header = header_lines(settings, device, points, points_csv.name)
        out_tmp.write_text(profile_text(base, fit, link, 2 if device.type == "cuda" else 1, header))
    for line in header[len(header) - len(residuals(points)):]:
        console.print(line.strip(), highlight=False)
    for line in warnings(points):
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    console.print(f"link: h2d {link['h2d'] / GB:.1f} GB/s, d2h {link['d2h'] / GB:.1f} GB/s, both at once "
                  f"{link['bidirectional'] / GB:.1f} GB/s, {link['latency'] * 1e6:.1f} us a call; a layer "
                  f"{fit.copy_slowdown_per_gb_s:.1%} slower per GB/s of copies; issuing a copy costs it "
                  f"{fit.copy_issue * 1e6:.0f} us + {fit.copy_issue_per_call * 1e6:.1f} us a call")
    console.print(f"wrote {out}, {points_csv.name} and {model_toml.name} in {time.perf_counter() - started:.0f} s; "
                  f"simulate with: pie-sim run --hw {out} --model {model_toml} ...", highlight=False)


def _calibrate(model, spec: ModelSpec, device: torch.device, grid: Grid, console):
    """Time and fit: (the fit, the link's figures, every point)."""
    run = Calibration(model, spec, device, grid)
    for step, what in ((run.time_compute, "compute"), (run.time_copies, "copies"), (run.time_contention, "contention")):
        console.print(f"timing {what}")  # not a live spinner: its thread would take the GIL from the timed work
        step()
    fit, link = run.fit()
    console.print(points_table(run.points))
    return fit, link, run.points
