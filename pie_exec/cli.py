"""`pie-exec`: the executor's command line."""
from __future__ import annotations

import argparse
import sys

from hwmodels import hardware_names, load_hardware


def cmd_env(args: argparse.Namespace) -> None:
    """What this machine offers the executor, and the catalog entry to simulate it with."""
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"cuda {torch.version.cuda}: {torch.cuda.device_count()} x {props.name}, "
              f"{props.total_memory / 1024**3:.1f} GiB, pinned host memory available")
        print("simulate with: one of " + ", ".join(n for n in hardware_names() if n != "cpu-host")
              + " (or a profile from `pie-exec calibrate`)")
    else:
        hw = load_hardware("cpu-host")
        print("cuda: not available; the executor runs on the CPU (FP32, copy thread instead of copy engines)")
        print(f"simulate with: cpu-host ({hw.description})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pie-exec", description="Pie's PyTorch executor.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="show the devices the executor can use").set_defaults(run=cmd_env)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
