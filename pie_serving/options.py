"""What the command lines (`pie-sim`, `pie-exec`, `pie-validate`) share: the engine options and the settings
they make for `pie_policy.sizing` (the policy package itself parses no command line), and how a command
runs and reports a user's error; what benchmark.json reports."""
from __future__ import annotations

import argparse
import warnings
from typing import Callable

from rich.console import Console
from rich.markup import escape

from .benchmark import DEFAULT_PERCENTILES
from .slo import Slo, parse_percentiles, parse_slos


def run_command(prog: str, command: Callable[[Console], int | None], user_errors: tuple[type[Exception], ...]) -> int:
    """Run `command` with a console at least 120 columns wide (tables stay whole in a log or a pipe); a
    user's error is one line naming it, exit status 2 (its text printed as it is, brackets included); a
    warning is one line too."""
    console = Console(width=max(Console().width, 120))
    warnings.formatwarning = lambda message, *_: f"{prog}: warning: {message}\n"
    try:
        return command(console) or 0
    except user_errors as e:
        console.print(f"[red]{prog}: error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine options both command lines take (see `engine_settings`)."""
    parser.add_argument("--share", type=float, help="static: CPU share (default 0.2); pie-fixed: its share (default "
                        "0.1); pie: largest share (default: the link's bound on the hardware the run is priced on)")
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
