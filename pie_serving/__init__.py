"""Serving a workload with a policy on any backend: the one serving loop (loop.py), what a run reports
(records.py: requests.csv, iterations.csv, summary.json, written alike by the simulator and the executor)
and the engine options both command lines take (options.py). Above pie_policy, below both backends."""
from .loop import Arrival, RunResult, Serving, ServingError, drive, serve
from .records import RunRecorder

__all__ = ["Arrival", "RunRecorder", "RunResult", "Serving", "ServingError", "drive", "serve"]
