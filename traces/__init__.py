"""Workloads: built-in traces (ShareGPT, synthetic Alpaca, Azure 2023), user CSV/JSONL, arrival processes."""
from .arrivals import gamma_arrivals
from .tables import COLUMNS, TraceError, read_table
from .workload import BUILTIN, load_trace, load_workload

__all__ = ["BUILTIN", "COLUMNS", "TraceError", "gamma_arrivals", "load_trace", "load_workload", "read_table"]
