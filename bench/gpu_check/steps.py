"""The check's steps in the order they run, what each measures and how long each is expected to take on
one H100 (ESTIMATED from the work each does: no GPU run has been made yet), and the entry point that runs
one step in a process of its own:

    python -m bench.gpu_check.steps NAME RESULT.json CONTEXT_JSON

A process a step: a step that fails, runs out of memory or leaves the CUDA context broken takes nothing
of the others with it, and one that overruns its time can be stopped.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from .context import ERROR, Context, Result


@dataclass(frozen=True)
class Step:
    name: str
    entry: str            # "module:function" in this package, called with the Context
    what: str
    estimate_s: int       # on one H100, full run (estimated, see the module docstring)
    needs: str = ""       # a step whose success this one needs


STEPS = (
    Step("env", "env:step", "the machine, the hardware entry, pinning 1.5 GiB", 10),
    Step("tokens", "tokens:step", "greedy tokens against transformers: OPT and Llama, every policy, tiny pools, "
                                  "FP32/FP16/BF16, both copy orderings", 60),
    Step("cuda-tests", "cuda_tests:step", "the test suite's CUDA-only tests", 45),
    Step("bandwidth", "bandwidth:step", "pinned h2d and d2h by copy size, both at once, pageable, d2d; against the "
                                        "hardware entry", 15),
    Step("overlap", "overlap:step", "decode with 0-20% of KV in CPU memory, prefetch depth 1-3, both copy "
                                    "orderings; compute under background copies", 100),
    Step("calibrate", "serving:calibrate", "pie-exec calibrate on a short grid", 70),
    Step("validate", "serving:validate", "pie-validate: vllm, static and pie on a few dozen requests, against the "
                                         "simulator", 80,
         needs="calibrate"),
)
BY_NAME = {step.name: step for step in STEPS}


def main(argv: list[str]) -> int:
    name, result_path, context = argv
    ctx = Context.from_json(context)
    module, function = BY_NAME[name].entry.split(":")
    try:
        result = getattr(importlib.import_module(f"{__package__}.{module}"), function)(ctx)
    except Exception as e:  # the step's error goes to the summary; the others still run
        trace = traceback.format_exc()
        print(trace, flush=True)
        result = Result(ERROR, f"{type(e).__name__}: {e}".splitlines()[0][:300],
                        ["```", *trace.rstrip().splitlines()[-15:], "```"])
    Path(result_path).write_text(json.dumps(dataclasses.asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
