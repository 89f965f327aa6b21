"""Command-line options that both `pie-sim` and `pie-exec` take: the engine's, and the settings they make
for `pie_policy.sizing` (the policy package itself parses no command line); what benchmark.json reports."""
from __future__ import annotations

import argparse

from .benchmark import DEFAULT_PERCENTILES
from .slo import Slo, parse_percentiles, parse_slos


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options both command lines take (see `engine_settings`)."""
    parser.add_argument("--share", type=float, help="static: CPU share (default 0.2); pie: largest share (default: the link's bound "
                        "in pie-sim, 0.5 in pie-exec)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--chunked-prefill", action="store_true")
    parser.add_argument("--prefetch-depth", type=int, default=1, help="layers prefetched ahead (pie, static)")
    parser.add_argument("--seed", type=int, default=0)


def engine_settings(args: argparse.Namespace) -> dict:
    """Keyword arguments for engine_config / build_policy from `add_engine_arguments`' options."""
    return dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs, chunked_prefill=args.chunked_prefill,
                prefetch_depth=args.prefetch_depth)


def add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    """What a run's benchmark.json reports beyond the fixed keys (see `metric_settings`)."""
    default = ",".join(f"{p:g}" for p in DEFAULT_PERCENTILES)
    parser.add_argument("--percentiles", default=default, help="percentiles of TTFT, TPOT, ITL and e2e latency "
                        f"in benchmark.json, comma-separated, each in (0, 100] (vLLM's --metric-percentiles; "
                        f"default {default})")
    parser.add_argument("--slo", action="append", metavar="METRIC_STAT=SECONDS",
                        help="an SLO whose per-request targets set benchmark.json's request_goodput, e.g. "
                             "ttft_p99=2 (metrics ttft, tpot, e2e, normalized, itl; STAT pNN or mean); repeat "
                             "for several (default: none, request_goodput null)")


def metric_settings(args: argparse.Namespace) -> tuple[tuple[float, ...], tuple[Slo, ...]]:
    """(percentiles, SLOs) from `add_metric_arguments`' options; a bad one raises SloError naming it."""
    return parse_percentiles(args.percentiles), parse_slos(args.slo)
