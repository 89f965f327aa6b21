"""Step tokens: the executor's greedy tokens on the device against transformers' with the same random
weights, for every case of tests/test_exec_engine.py (OPT and Llama; every executor policy with tiny
GPU pools that force CPU residency and preemption), in FP32, FP16 and BF16 and, on a GPU, under both
copy orderings. Writes tokens.csv (one row per model, dtype, case and ordering).

Transformers runs teacher-forced on the executor's own tokens, and the two models' logits are compared
at every generated position. Within the dtype's rounding (TOLERANCE), a token other than transformers'
argmax is a near-tie that rounding decided; a KV block read from the wrong place moves the logits by
about their spread. Measured on the CPU: largest difference 1e-5 (FP32), 6e-3 (FP16), 2.3e-2 (BF16);
with a prefetch that zeroes its staging slot one time in five, 1.5 (median) to 4.8. A case passes when
every logit is within tolerance and it did what it is meant to (preempt, move KV through CPU memory).
Also counted: whole sequences identical to transformers' own greedy `generate`.
"""
from __future__ import annotations

import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from pie_exec.copier import ORDERINGS, STREAM
from pie_exec.engine import Executor
from pie_exec.model import ArchDetails
from pie_exec.options import DTYPES
from pie_exec.run import Prompt, run
from pie_exec.weights import random_transformer, save_hf_folder
from tests.test_exec_engine import CASES, NEW_TOKENS, PROMPT_LENGTHS, SPECS

from .context import FAILED, OK, Context, Result, table, write_rows

TOLERANCE = {"float32": 1e-3, "float16": 0.05, "bfloat16": 0.2}  # largest |logit difference| accepted


def dtypes(ctx: Context) -> tuple[str, ...]:
    """All three on a GPU (FP16 alone with --quick); BF16 on the CPU (FP32 is the test suite's)."""
    if not ctx.cuda:
        return ("bfloat16",)
    return ("float16",) if ctx.quick else ("float32", "float16", "bfloat16")


class LogitsKept:
    """An executor that also keeps, per request, the logits of every token it samples."""

    def __init__(self, executor: Executor):
        self.executor, self.logits = executor, defaultdict(list)

    def execute(self, plan, token_ids, run_start):
        stats, sampled, logits = self.executor.execute(plan, token_ids, run_start)
        for seq, row in zip([s for s in plan.seqs if s.samples], logits.float().cpu()):
            self.logits[seq.request_id].append(row)
        return stats, sampled, logits


def prompts_for(spec) -> list[Prompt]:
    """The test suite's prompts (its `tiny` fixture's)."""
    gen = torch.Generator().manual_seed(2)
    return [Prompt(i, 0.0, tuple(torch.randint(0, spec.vocab_size, (length,), generator=gen).tolist()), new)
            for i, (length, new) in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS))]


def reference_model(folder: Path, dtype: torch.dtype):
    """Transformers' model of `folder` loaded at `dtype` (loaded, not cast afterwards: a cast would take
    its RoPE frequencies down to the dtype too, which transformers does not do, and its logits then differ
    from its own by 0.15 in BF16). `dtype=` since transformers 4.56, `torch_dtype=` before."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if hf.dtype != dtype:  # an older transformers took `dtype` for a config field
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype)
    return hf


@torch.no_grad()
def generated_by(hf, prompts: list[Prompt], device) -> list[list[int]]:
    """Transformers' own greedy continuations."""
    out = []
    for p in prompts:
        ids = torch.tensor([p.token_ids], device=device)
        seq = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_new_tokens,
                          min_new_tokens=p.max_new_tokens, do_sample=False, pad_token_id=0)
        out.append(seq[0, len(p.token_ids):].tolist())
    return out


@torch.no_grad()
def teacher_forced(hf, prompt: Prompt, tokens: list[int], device) -> torch.Tensor:
    """Transformers' logits for each of `tokens` after the prompt and the tokens before it: [n, vocab]."""
    seq = torch.tensor([[*prompt.token_ids, *tokens]], device=device)
    return hf(seq, attention_mask=torch.ones_like(seq)).logits[0, len(prompt.token_ids) - 1:-1].float().cpu()


def serve_case(model, spec, case: str, ordering: str, device, prompts: list[Prompt]):
    """(requests, generated tokens, recorder, kept logits) of one case on the executor."""
    policy = CASES[case](spec)
    executor = Executor(model, policy.config, device, policy.staging_slots, copy_ordering=ordering)
    kept = LogitsKept(executor)
    try:
        requests, generated, recorder, _ = run(kept, policy, prompts, progress=False)
    finally:
        executor.close()
    return requests, generated, recorder, kept.logits


def check_case(hf, case: str, served, prompts: list[Prompt], expected: list[list[int]], tolerance: float,
               device) -> dict:
    """The comparison of one served case, as a row of tokens.csv."""
    requests, generated, recorder, logits = served
    tokens = equal = identical = 0
    error, problems = 0.0, []
    for i, p in enumerate(prompts):
        ours = torch.stack(logits[i]) if logits[i] else torch.empty(0)
        if len(generated[i]) != p.max_new_tokens or ours.shape[0] != len(generated[i]):
            problems.append(f"request {i}: {len(generated[i])} tokens, {ours.shape[0]} logits rows")
            continue
        reference = teacher_forced(hf, p, generated[i], device)
        error = max(error, (ours - reference).abs().max().item())
        tokens += len(generated[i])
        equal += int((reference.argmax(-1) == torch.tensor(generated[i])).sum())
        identical += generated[i] == expected[i]
    its = recorder.iterations
    if error > tolerance:
        problems.append(f"logits differ by {error:.3g} > {tolerance:g}")
    if "preempting" in case and not any(r.preemptions for r in requests):
        problems.append("no preemption")
    if "CPU" in case and not (its["cpu_kv_bytes"].max() > 0 and its["bytes_h2d"].sum() > 0):
        problems.append("no KV in CPU memory")
    return {"tokens": tokens, "argmax_equal": equal, "near_ties": tokens - equal, "max_logit_error": error,
            "tolerance": tolerance, "identical_sequences": identical, "requests": len(prompts),
            "preemptions": sum(r.preemptions for r in requests), "bytes_h2d": int(its["bytes_h2d"].sum()),
            "bytes_d2h": int(its["bytes_d2h"].sum()), "verdict": "ok" if not problems else "; ".join(problems)}


def step(ctx: Context) -> Result:
    device = torch.device(ctx.device)
    orderings = ORDERINGS if ctx.cuda else (STREAM,)  # one copy thread on the CPU: the orderings are one
    rows = []
    with tempfile.TemporaryDirectory(prefix="pie-gpu-check-") as folder:
        for family, spec in SPECS.items():
            base = random_transformer(spec, seed=1).eval()
            saved = save_hf_folder(base, spec, ArchDetails(), Path(folder) / family)
            prompts = prompts_for(spec)
            for name in dtypes(ctx):
                dtype = DTYPES[name]
                hf = reference_model(saved, dtype).to(device).eval()
                model = random_transformer(spec, seed=1).eval().to(device=device, dtype=dtype)
                expected = generated_by(hf, prompts, device)
                for case in CASES:
                    for ordering in orderings:
                        start = time.perf_counter()
                        served = serve_case(model, spec, case, ordering, device, prompts)
                        row = {"model": spec.name, "dtype": name, "case": case, "ordering": ordering}
                        row.update(check_case(hf, case, served, prompts, expected, TOLERANCE[name], device))
                        rows.append({**row, "seconds": time.perf_counter() - start})
    failed = [r for r in rows if r["verdict"] != "ok"]
    lines = table(["model", "dtype", "cases ok", "tokens", "near ties", "max logit error", "tolerance",
                   "sequences as generate"], summary_rows(rows))
    lines += ["", f"Every case of tests/test_exec_engine.py ({len(CASES)}: every executor policy) under "
              f"{', '.join(orderings)} ordering{'s' if len(orderings) > 1 else ''}; near ties: tokens other than "
              "transformers' argmax with every logit within tolerance."]
    lines += [f"- FAILED: {r['model']} {r['dtype']} {r['case']} ({r['ordering']}): {r['verdict']}" for r in failed]
    note = f"{len(failed)} of {len(rows)} cases failed" if failed else f"{len(rows)} cases"
    return Result(FAILED if failed else OK, note, lines, [write_rows(ctx.folder / "tokens.csv", rows)])


def summary_rows(rows: list[dict]) -> list[list]:
    out = []
    for key in dict.fromkeys((r["model"], r["dtype"]) for r in rows):
        mine = [r for r in rows if (r["model"], r["dtype"]) == key]
        out.append([*key, f"{sum(r['verdict'] == 'ok' for r in mine)} of {len(mine)}", sum(r["tokens"] for r in mine),
                    sum(r["near_ties"] for r in mine), f"{max(r['max_logit_error'] for r in mine):.2g}",
                    f"{mine[0]['tolerance']:g}",
                    f"{sum(r['identical_sequences'] for r in mine)} of {sum(r['requests'] for r in mine)}"])
    return out
