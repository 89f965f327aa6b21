"""`pie-sim sweep GRID.toml --out DIR`: every combination of run options, each point exactly the run
`pie-sim run` would make, in parallel local processes or as Ray tasks, resumable.

GRID.toml names `Scenario` options (the run options, spelt with underscores: `num_requests`,
`gpu_mem_util`, ...). A key whose value is a list is an axis; a scalar is fixed for every point. The points
are the Cartesian product of the axes, in the order the axes appear in the file, the last varying fastest.
An option left out keeps `pie-sim run`'s default; TOML has no null, so leave `rate`, `share` or
`cpu_mem_gb` out to keep their "not set" default (the trace's times, the policy's share, 240 GiB or the
host's memory). `inf` is TOML's infinity (`rate = inf`: every request at time 0). Example::

    model = ["opt-1.3b", "opt-13b"]     # axis
    policy = ["vllm", "pie"]            # axis
    rate = [2.0, 8.0, inf]              # axis
    num_requests = 200                  # fixed

is 2 x 2 x 3 = 12 points. The whole grid is checked before anything runs: an unknown option, an empty
axis, a repeated value, a value of the wrong type or an unknown hardware, model, trace or policy name is
one error naming its key, and so is a value the option's rule refuses (`block_size = 0`; the rules of
`pie-sim run`'s options) or an option no policy of the grid uses (`micro_batches` without pp-vllm or
pipemax, `share` without a policy that keeps live KV in CPU memory, `cv` without `rate`). Combinations
that cannot run (a model that does not fit) fail as points.

DIR/points/ keeps one JSON per finished point (strict JSON: infinity written as null), named by a hash of
all its options (a hardware, model or trace file by its path, not its contents) and written atomically as soon as the point finishes, so an
interrupted sweep loses only the points in flight and a re-run skips the finished ones and retries the
failed ones. DIR/results.parquet and DIR/results.csv: one row per point in grid order (whatever the
workers or the order they finish in): `point` (the hash), every option, the summary's metrics,
`sustainable` (whether the point's rate is sustainable at steady state, steady_state.py; empty where its
run cannot say: every request at once, too few requests, or a window too short against latency), `status` (ok/error) and `error`. The point
files are strict JSON: an infinite rate is null there (the table takes the options from the grid).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json
import logging
import os
import signal
import tempfile
import typing
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from hwmodels import load_hardware, load_model
from hwmodels.spec import read_toml
from pie_policy import ConfigError
from pie_policy.registry import SIM, entry
from pie_serving.outputs import json_text
from pie_serving.processes import worker_pool
from traces import FORMATS, load_trace

from .scenario import RULES, Scenario, check_policy_options, summarize_steady

BACKENDS = ("local", "ray")
PACKAGES = ("hwmodels", "pie_policy", "pie_serving", "pie_sim", "traces")  # what a point's run imports: shipped to Ray

_OPTION_TYPES = typing.get_type_hints(Scenario)
# Checked once per distinct value before anything runs: a misspelt name is the grid's error, not each point's.
_NAMED_BY = {"hw": load_hardware, "model": load_model, "trace": load_trace}


def _check_value(key: str, value, where: str) -> None:
    """A named hardware, model, trace or policy must exist; a number must be what the option takes."""
    if key == "policy":
        try:
            entry(value, SIM)
        except ConfigError as e:
            raise ConfigError(f"policy: {e}") from None
    elif key == "trace_format":
        if value not in ("auto", *FORMATS):
            raise ConfigError(f"trace_format: unknown format '{value}' (known: auto, {', '.join(FORMATS)})")
    elif key in _NAMED_BY:
        _NAMED_BY[key](value)
    elif key in RULES:
        try:
            RULES[key].check(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


def _typed(key: str, value, where: str):
    """`value` as option `key`'s type (an integer is a float where a float is wanted, so that `rate = 5`
    and `rate = 5.0` are one point); anything else is refused naming `where`."""
    hint = _OPTION_TYPES[key]
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)  # float | None: float
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if type(value) is kind:  # `is`: a bool is an int to isinstance, not to a grid
        return value
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    raise ConfigError(f"{where}: {value!r} is not {names[kind]}")


def expand_grid(grid: dict) -> list[Scenario]:
    """The grid's points in order (axes in the grid's order, the last varying fastest), every value checked."""
    unknown = sorted(set(grid) - set(Scenario.options()))
    if unknown:
        raise ConfigError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                          f"(known: {', '.join(Scenario.options())})")
    axes = {}
    for key, value in grid.items():
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{key}: empty axis (give at least one value)")
            values = [_typed(key, v, f"{key}[{i}]") for i, v in enumerate(value)]
            repeated = [v for i, v in enumerate(values) if v in values[:i]]
            if repeated:
                raise ConfigError(f"{key}: the axis repeats {repeated[0]!r}")
        else:
            values = [_typed(key, value, key)]
        for i, v in enumerate(values):
            _check_value(key, v, f"{key}[{i}]" if isinstance(value, list) else key)
        axes[key] = values
    check_policy_options(axes.get("policy", [Scenario.policy]), next(iter(axes.get("micro_batches", [])), None),
                         next(iter(axes.get("share", [])), None), spell=str)
    if "cv" in axes and "rate" not in axes:
        raise ConfigError("cv shapes the gaps of re-timed arrivals: it needs rate")
    return [Scenario.from_options(dict(zip(axes, combination))) for combination in itertools.product(*axes.values())]


def load_grid(path: str | Path) -> list[Scenario]:
    return expand_grid(read_toml(Path(path)))


# Options added after sweeps were saved, with their defaults: hashed only when set, so that the points of
# those sweeps keep their ids.
LATER_OPTIONS = {"trace_format": "auto", "tp": 1}


def point_id(s: Scenario) -> str:
    """Stable across runs and machines: a hash of every option, defaults included (so a grid that spells a
    default out names the same point as one that leaves it out), but LATER_OPTIONS at their defaults."""
    options = {k: v for k, v in dataclasses.asdict(s).items() if k not in LATER_OPTIONS or v != LATER_OPTIONS[k]}
    text = json.dumps(options, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(s: Scenario, summary: dict | None, error: str | None) -> dict:
    return dict(point=point_id(s), options=dataclasses.asdict(s), status="error" if error else "ok", error=error,
                summary=summary)


def run_point(s: Scenario) -> dict:
    """One point's record; any exception is the point's error, not the sweep's (the worker's function)."""
    try:
        return _record(s, summarize_steady(s), None)
    except Exception as e:  # whatever the run raises is reported against its point
        return _record(s, None, f"{type(e).__name__}: {e}")


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it only once written: a kill leaves the old file or none."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _record_path(out: Path, point: str) -> Path:
    return out / "points" / f"{point}.json"


def save_record(out: Path, record: dict) -> None:
    with _atomic(_record_path(out, record["point"])) as tmp:
        tmp.write_text(json_text(record, indent=1) + "\n")


def load_record(out: Path, s: Scenario) -> dict | None:
    path = _record_path(out, point_id(s))
    return json.loads(path.read_text()) if path.exists() else None


def todo(points: list[Scenario], out: Path) -> list[Scenario]:
    """The points without a successful record (never run, interrupted, or failed: retried)."""
    return [s for s in points if (load_record(out, s) or {}).get("status") != "ok"]


def _die_at_interrupt() -> None:
    """A worker ends at Ctrl-C instead of finishing its point and the ones queued to it: the sweep would
    drop their results anyway, and should stop now."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _local_records(points: list[Scenario], workers: int) -> Iterator[dict]:
    """Records as local worker processes finish them. A worker that dies (out of memory, killed) breaks the
    pool: every point it had not finished is reported as failed (and retried by a re-run). Ctrl-C, SIGTERM
    or the caller stopping kills the workers (they die with this process too) and drops the points queued."""
    with worker_pool(min(workers, len(points)), _die_at_interrupt) as pool:
        futures = {pool.submit(run_point, s): s for s in points}
        for future in as_completed(futures):
            try:
                yield future.result()
            except BrokenProcessPool as e:
                yield _record(futures[future], None, f"not finished: a worker process died while this point was "
                                                     f"queued or running ({type(e).__name__}: {e})")


def _ray_records(points: list[Scenario], workers: int | None, address: str | None) -> Iterator[dict]:
    """Records as Ray tasks finish them, at most `workers` in flight (None: all, Ray schedules them). The
    packages travel with the tasks (runtime_env py_modules), so a cluster needs Pie's dependencies, not
    Pie, and runs this very code; hardware, model and trace files named by path must exist on its nodes."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray, which Pie does not install: pip install ray") from None
    ray.init(address=address, runtime_env={"py_modules": [importlib.import_module(name) for name in PACKAGES]},
             logging_level=logging.WARNING)
    task = ray.remote(run_point)
    queue, in_flight = iter(points), {}

    def submit(n: int) -> None:
        for s in itertools.islice(queue, n):
            in_flight[task.remote(s)] = s

    try:
        submit(workers or len(points))
        while in_flight:
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            s = in_flight.pop(ref)
            submit(1)
            try:
                yield ray.get(ref)
            except ray.exceptions.RayError as e:  # the task's worker or node died; run_point itself never raises
                yield _record(s, None, f"Ray: {type(e).__name__}: {e}")
    finally:
        for ref in in_flight:
            ray.cancel(ref)
        ray.shutdown()


def run_sweep(points: list[Scenario], out: Path, *, backend: str = "local", workers: int | None = None,
              address: str | None = None, on_record: Callable[[dict], None] = lambda record: None) -> None:
    """Run `points` (the ones still to do: see `todo`) and save each record as it comes; `on_record` sees it."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, not {workers}")
    if not points:
        return
    (out / "points").mkdir(parents=True, exist_ok=True)
    records = (_local_records(points, workers or os.cpu_count() or 1) if backend == "local"
               else _ray_records(points, workers, address))
    with closing(records):  # an interrupt ends the workers now, not when the generator is collected
        for record in records:
            save_record(out, record)
            on_record(record)


# Wall-clock, not simulated: the only columns two runs of one grid may disagree on.
MEASURED_COLUMNS = ("wall_s",)


def varying_options(points: list[Scenario]) -> list[str]:
    """The options that tell the points apart (the grid's axes of more than one value)."""
    return [k for k in Scenario.options() if len({getattr(s, k) for s in points}) > 1]


def results_table(points: list[Scenario], out: Path) -> pd.DataFrame:
    """One row per point in grid order: the point's hash, options, metrics (the summary's other fields),
    status and error. A point with no record yet (an interrupted sweep) is an error row."""
    rows, metrics = [], {}
    for s in points:
        record = load_record(out, s) or _record(s, None, "not run yet (the sweep was interrupted): run it again")
        summary, options = record["summary"] or {}, dataclasses.asdict(s)  # the record's JSON has null for inf
        metrics.update(dict.fromkeys(k for k in summary if k not in options))
        rows.append({**summary, **options, "point": record["point"], "status": record["status"],
                     "error": record["error"]})  # where the summary repeats an option, the option's value
    columns = ["point", *Scenario.options(), *metrics, "status", "error"]
    return pd.DataFrame(rows, columns=columns)


def write_results(points: list[Scenario], out: Path) -> pd.DataFrame:
    """DIR/results.parquet and DIR/results.csv from the saved records."""
    table = results_table(points, out)
    out.mkdir(parents=True, exist_ok=True)
    with _atomic(out / "results.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    with _atomic(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table
