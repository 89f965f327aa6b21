"""Pipeline parallelism (pie_exec.pipeline): the stages generate exactly the single-process executor's tokens.

Fast: the stages' executors run one after another in this process, with a copier that delays every copy as
long as a GPU may, so that an order between copies the stages leave out shows as wrong tokens. Slow: the
real thing, one process a stage over gloo, through `serve` and the command line.
"""
import json
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from pie_exec.cli import main as pie_exec
from pie_exec.engine import Executor
from pie_exec.model import ArchDetails, Block
from pie_exec.pipeline import serve, stage_layers
from pie_exec.run import InputError, Prompt, run
from pie_exec.weights import random_transformer, save_hf_folder
from pie_policy import IterationStats, Policy
from pie_policy.pipeline_layout import split_layers

from .test_exec_engine import NEW_TOKENS, PROMPT_LENGTHS, SPECS, config, pie

SPEC = replace(SPECS["llama"], name="tiny-llama-5", num_layers=5)  # 5 layers: no even split into 2 or 3
CASES = {
    "vllm-swap, preempting": lambda s: Policy("vllm-swap", config(s, 15, 60)),
    "static, most KV on CPU, prefetch 2 ahead": lambda s: Policy("static", config(s, 12, 40, prefetch_depth=2),
                                                                 cpu_share=0.75),
    "pie, chunked prefill, CPU": lambda s: pie(s, config(s, 14, 14, chunked_prefill=True)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is ~20x faster than two busy-waiting on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(one_thread):
    """(model, prompts, the single-process executor's tokens per case)."""
    model = random_transformer(SPEC, seed=1).eval()
    gen = torch.Generator().manual_seed(2)
    prompts = [Prompt(i, 0.0, tuple(torch.randint(0, SPEC.vocab_size, (length,), generator=gen).tolist()), new)
               for i, (length, new) in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS))]
    expected = {}
    for case, make in CASES.items():
        policy = make(SPEC)
        executor = Executor(model, policy.config, torch.device("cpu"), policy.staging_slots)
        try:
            expected[case] = run(executor, policy, prompts, progress=False)[1]
        finally:
            executor.close()
    return model, prompts, expected


class LazyCopier:
    """Runs a copy as late as a GPU may: when a layer waits for it, or when a copy that must follow it runs
    (one it is `after`, or a later one of its direction: one stream each). A stage that leaves out an
    order its data needs then reads stale KV, as it could on a GPU; the CPU copier, running every copy at
    once in issue order, would hide that."""

    def __init__(self):
        self.pending = {}  # op id -> (copy, work), in issue order

    def issue(self, copy, work):
        self.pending[copy.op_id] = (copy, work)

    def wait(self, op_ids):
        for op in op_ids:
            self._run(op)

    def _run(self, op):
        if op not in self.pending:
            return
        copy, work = self.pending[op]
        for before in copy.after:
            self._run(before)
        for earlier in list(self.pending):
            if earlier == op:
                break
            if earlier in self.pending and self.pending[earlier][0].direction == copy.direction:
                self._run(earlier)
        del self.pending[op]
        work()

    def computed(self, layer, staging, done):
        pass  # copies run when they are needed, whatever compute has been issued

    def take_busy(self):
        return {"h2d": 0.0, "d2h": 0.0}

    def close(self):
        pass


class StagesInTurn:
    """A pipeline's stages in this process, each plan through one after another: pipeline.py without
    processes and messages, for `run`."""

    def __init__(self, model, policy, stages):
        self.executors = [Executor(model, policy.config, torch.device("cpu"), policy.staging_slots, layers)
                          for layers in stage_layers(policy.config.num_layers, stages)]
        for executor in self.executors:
            executor.copier.close()
            executor.copier = LazyCopier()

    def execute(self, plan, token_ids, run_start):
        output, compute, stall = torch.tensor([t for seq in token_ids for t in seq]), 0.0, 0.0
        for executor in self.executors:
            output, _, times = executor.run_stage(plan, executor.kv.bind(plan), lambda given=output: given)
            compute, stall = compute + times.compute_s, stall + times.stall_s
        return IterationStats(plan.iteration, 0.0, 0.0, compute, stall, *plan.bytes_moved(), 0.0, 0.0), output, None


def test_stages_take_contiguous_slices_sized_as_the_simulated_pipeline_splits_them():
    for layers in range(1, 10):
        for stages in range(1, layers + 1):
            split = stage_layers(layers, stages)
            assert [r.start for r in split[1:]] == [r.stop for r in split[:-1]]
            assert split[0].start == 0 and split[-1].stop == layers and all(r.step == 1 for r in split)
            assert tuple(len(r) for r in split) == split_layers(layers, stages)
    assert [len(r) for r in stage_layers(12, 5)] == [2, 2, 3, 3, 2]  # vLLM's: the remainder before the last


@pytest.mark.parametrize("stages", [0, -1, 6])
def test_stage_layers_refuses_a_bad_stage_count(stages):
    with pytest.raises(InputError, match=rf"--pipeline-stages {stages}: need 1 to 5 stages"):
        stage_layers(5, stages)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_stages_in_turn_generate_the_single_process_tokens(tiny, case, stages):
    model, prompts, expected = tiny
    policy = CASES[case](SPEC)
    pipeline = StagesInTurn(model, policy, stages)
    _, generated, recorder, _ = run(pipeline, policy, prompts, progress=False)
    assert generated == expected[case]
    assert recorder.iterations["bytes_h2d"].sum() > 0 and recorder.iterations["bytes_d2h"].sum() > 0
    assert tuple(len(e.layers) for e in pipeline.executors) == split_layers(5, stages)
    assert all(e.kv.gpu.shape[0] == len(e.layers) for e in pipeline.executors)


def test_lazy_copier_catches_a_missing_order(tiny, monkeypatch):
    """Without the stages' own write-back order (`Executor._local`), the lazy copier's tokens differ: the
    test above can fail."""
    model, prompts, expected = tiny
    case = "static, most KV on CPU, prefetch 2 ahead"
    monkeypatch.setattr(Executor, "_last_write_back", property(lambda self: None, lambda self, op: None),
                        raising=False)
    policy = CASES[case](SPEC)
    _, generated, _, _ = run(StagesInTurn(model, policy, 2), policy, prompts, progress=False)
    assert generated != expected[case]


# ---------------------------------------------------------------- over processes (gloo)

class FailingBlock(Block):
    def forward(self, h, positions, attend):
        raise RuntimeError("layer failed on purpose")


@pytest.mark.slow
def test_three_processes_generate_the_single_process_tokens(tiny):
    model, prompts, expected = tiny
    case = "pie, chunked prefill, CPU"
    requests, generated, recorder, _ = serve(model, CASES[case](SPEC), prompts, 3, threads=1)
    assert generated == expected[case]
    its = recorder.iterations
    assert len(requests) == len(prompts) and its["bytes_h2d"].sum() > 0
    assert (its["compute_s"] > 0).all() and (its["end_s"] > its["start_s"]).all()


@pytest.mark.slow
def test_a_failing_stage_ends_the_run_at_once(tiny):
    """The last stage fails while rank 0 waits for its tokens: spawn ends every rank and raises."""
    model, prompts, _ = tiny
    broken = random_transformer(SPEC, seed=1).eval()
    broken.layers[4] = FailingBlock(SPEC, ArchDetails())
    start = time.perf_counter()
    with pytest.raises(mp.ProcessRaisedException, match="layer failed on purpose"):
        serve(broken, CASES["vllm-swap, preempting"](SPEC), prompts, 2, threads=1)
    assert time.perf_counter() - start < 60


@pytest.mark.slow
def test_cli_two_stages_write_the_single_process_tokens(tmp_path, write):
    spec = SPECS["opt"]
    folder = save_hf_folder(random_transformer(spec, seed=3), spec, ArchDetails(), tmp_path / "opt")
    prompts = write("p.jsonl", "".join(json.dumps({"id": i, "prompt_token_ids": list(range(3 + 5 * i, 9 + 7 * i)),
                                                   "max_new_tokens": 6 + i}) + "\n" for i in range(4)))
    outputs = {}
    for stages in (1, 2):
        out = tmp_path / f"out{stages}"
        assert pie_exec(["run", "--model-path", str(folder), "--prompts", str(prompts), "--policy", "static",
                         "--gpu-kv-gb", "0.0001", "--pipeline-stages", str(stages), "--out", str(out)]) == 0
        outputs[stages] = (out / "tokens.jsonl").read_text()
        assert {p.name for p in out.iterdir()} >= {"requests.csv", "iterations.csv", "summary.json", "tokens.jsonl"}
        assert json.loads((out / "summary.json").read_text())["pipeline_stages"] == stages
    assert outputs[1] == outputs[2]


@pytest.mark.parametrize("stages, message", [("0", "--pipeline-stages must be a positive integer, got 0"),
                                            ("3", "--pipeline-stages 3: need 1 to 2 stages")])
def test_cli_refuses_a_bad_stage_count(tmp_path, write, capsys, stages, message):
    spec = SPECS["opt"]
    folder = save_hf_folder(random_transformer(spec, seed=3), spec, ArchDetails(), tmp_path / "opt")
    prompts = write("p.jsonl", '{"prompt_token_ids": [1, 2], "max_new_tokens": 2}\n')
    out = tmp_path / "out"
    code = pie_exec(["run", "--model-path", str(folder), "--prompts", str(prompts), "--pipeline-stages", stages,
                     "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 2 and message in printed.out + printed.err, printed
    assert not out.exists()
