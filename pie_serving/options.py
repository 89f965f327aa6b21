"""Command-line options for the engine that both `pie-sim` and `pie-exec` take, and the settings they
make for `pie_policy.sizing` (the policy package itself parses no command line)."""
from __future__ import annotations

import argparse


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
