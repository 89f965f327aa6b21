"""`pie-sim`: the simulator's command line."""
from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hwmodels import CatalogError, CostModel, load_hardware, load_model
from traces import TraceError, load_trace

from .plots import plot_preview
from .preview import SHARES, preview_all

DEFAULT_HW = "gh200-96g,h100-pcie5,h200-pcie5,a100-80g-pcie4"


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_preview(args: argparse.Namespace, console: Console) -> None:
    table = load_trace(args.trace)
    context = int(round((table.prompt_tokens + table.output_tokens).mean()))
    models = [load_model(name) for name in _names(args.model)]
    systems = [load_hardware(name) for name in _names(args.hw)]
    pairs = [CostModel(hw, model) for model in models for hw in systems]
    rows, curves, skipped = preview_all(pairs, context, args.gpu_mem_util, args.max_seqs)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    view = Table(title=f"Cost-model preview: decode at mean context {context} tokens ({args.trace}), "
                       f"gpu_mem_util {args.gpu_mem_util}, max {args.max_seqs} sequences")
    for header in ("hardware", "model", "weights\nGiB", "KV pool\nGiB", "GPU-only\nbatch", "GPU-only\ntok/s",
                   "best CPU\nshare", "pooled\nbatch", "pooled\ntok/s", "gain"):
        view.add_column(header, justify="left" if header in ("hardware", "model") else "right")
    for r in rows:
        view.add_row(r.hw, r.model, f"{r.weights_gib:.1f}", f"{r.kv_pool_gib:.1f}", str(r.gpu_only_batch),
                     f"{r.gpu_only_tok_s:,.0f}", f"{r.best_cpu_share:.0%}", str(r.pooled_batch),
                     f"{r.pooled_tok_s:,.0f}", f"{r.gain:.2f}x")
    console.print(view)
    for reason in skipped:
        console.print(f"[yellow]skipped:[/] {reason}")

    with open(out / "preview.csv", "w", newline="") as f:
        writer = csv.writer(f)
        names = [field.name for field in dataclasses.fields(rows[0])] if rows else []
        writer.writerow(names + ["gain"])
        writer.writerows([getattr(r, n) for n in names] + [r.gain] for r in rows)
    plot_preview(SHARES, rows, curves, out / "preview.png")
    console.print(f"wrote {out / 'preview.csv'} and {out / 'preview.png'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pie-sim", description="Pie's simulator of CPU-pooled LLM inference.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("preview", help="closed-form cost-model preview of CPU pooling per system")
    p.add_argument("--hw", default=DEFAULT_HW, help=f"comma-separated systems or TOML files (default {DEFAULT_HW})")
    p.add_argument("--model", default="opt-13b,opt-30b", help="comma-separated models or TOML files")
    p.add_argument("--trace", default="sharegpt", help="trace name or CSV/JSONL file (sets the mean context)")
    p.add_argument("--gpu-mem-util", type=float, default=0.9, help="share of HBM the engine may use")
    p.add_argument("--max-seqs", type=int, default=256, help="most sequences in one batch (vLLM's default)")
    p.add_argument("--out", default="out/preview", help="folder for preview.csv and preview.png")
    p.set_defaults(run=cmd_preview)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=max(Console().width, 120))
    try:
        args.run(args, console)
    except (CatalogError, TraceError, ValueError) as e:
        console.print(f"[red]pie-sim: error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
