"""Workloads: built-in traces (ShareGPT, synthetic Alpaca, Azure 2023), user files (CSV/JSONL tables, Azure and
Vidur trace CSVs, ShareGPT-format JSON), arrival processes."""
from .arrivals import gamma_arrivals
from .tables import COLUMNS, FORMATS, TraceError, read_table
from .workload import BUILTIN, load_trace, load_workload

__all__ = ["BUILTIN", "COLUMNS", "FORMATS", "TraceError", "gamma_arrivals", "load_trace", "load_workload", "read_table"]
