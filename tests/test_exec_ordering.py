"""What a copy waits for before it starts (pie_exec/copier.py): the compute its data depends on.

On the CPU: the engine's issue order makes the reduced ordering (`events`: a prefetch waits for the last
layer that used its staging slot, a write-back for its own layer) wait for the same compute as the
`stream` ordering (everything issued before the copy) in a whole-model plan; and `CudaCopier` picks those
events, checked with stand-ins for torch.cuda's streams and events. On a GPU, tests/test_exec_cuda.py
times the orderings for real.
"""
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch

from bench.gpu_check.tokens import prompts_for
from pie_exec.copier import EVENTS, STREAM, CpuCopier, CudaCopier
from pie_exec.engine import Executor
from pie_exec.run import run
from pie_exec.weights import random_transformer
from pie_policy import Policy
from pie_policy.plan import BLOCK_KV, D2H, H2D, LAYER_KV, Copy

from .test_exec_engine import SPECS, config, pie


class SpyCopier(CpuCopier):
    """The CPU copier, logging the layers computed and the layer-KV copies issued, in order."""

    def __init__(self, log: list):
        super().__init__()
        self.log = log

    def computed(self, layer, staging, done):
        self.log.append(("computed", layer, staging))

    def issue(self, copy, work):
        if copy.kind == LAYER_KV:
            self.log.append(("issue", copy))
        super().issue(copy, work)


class LoggingExecutor(Executor):
    """An executor whose log also marks where each plan starts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.copier.close()
        self.log: list = []
        self.copier = SpyCopier(self.log)

    def execute(self, plan, token_ids, run_start):
        self.log.append(("plan", plan.iteration))
        return super().execute(plan, token_ids, run_start)


POLICIES = {
    "static, depth 1": lambda s: Policy("static", config(s, 12, 40), cpu_share=0.75),
    "static, depth 2": lambda s: Policy("static", config(s, 12, 40, prefetch_depth=2), cpu_share=0.75),
    "static, depth 3": lambda s: Policy("static", config(s, 12, 40, prefetch_depth=3), cpu_share=0.75),
    "pie, chunked prefill": lambda s: pie(s, config(s, 14, 14, chunked_prefill=True)),
}


@pytest.mark.parametrize("case", list(POLICIES))
def test_a_layer_copy_depends_on_the_latest_compute_issued_before_it(case):
    """Within a plan, once a layer has computed: a prefetch's staging slot was last used by the layer
    computed last, and a write-back's layer is the layer computed last. So waiting for that layer's event
    (`events`) is waiting for all compute issued so far (`stream`). Copies issued before a plan's first layer
    follow the previous plan's, which the engine has synchronised."""
    spec = replace(SPECS["llama"], num_layers=4)  # room for a prefetch 3 layers ahead
    model = random_transformer(spec, seed=1).eval()
    policy = POLICIES[case](spec)
    executor = LoggingExecutor(model, policy.config, torch.device("cpu"), policy.staging_slots)
    try:
        run(executor, policy, prompts_for(spec), progress=False)
    finally:
        executor.close()
    checked = {H2D: 0, D2H: 0}
    latest, slot_reader, layer_done, in_plan = None, {}, {}, False
    for entry in executor.log:
        if entry[0] == "plan":
            in_plan = False
        elif entry[0] == "computed":
            _, layer, staging = entry
            latest = layer_done[layer] = object()
            if staging is not None:
                slot_reader[staging] = latest
            in_plan = True
        elif in_plan:
            copy = entry[1]
            dependency = slot_reader.get(copy.staging) if copy.direction == H2D else layer_done[copy.layer]
            assert dependency is latest, (case, copy)
            checked[copy.direction] += 1
    assert checked[H2D] > 0 and checked[D2H] > 0, checked  # both kinds of copy were issued mid-plan


class FakeStream:
    def __init__(self, name: str):
        self.name, self.waits = name, []

    def wait_stream(self, other):
        self.waits.append(("stream", other.name))

    def wait_event(self, event):
        self.waits.append(("event", event))


class FakeEvent:
    def __init__(self, enable_timing=False):
        pass

    def record(self, stream=None):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's streams and events replaced by stand-ins that log what each stream waits for."""
    compute, made = FakeStream("compute"), iter(("h2d", "d2h"))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream(next(made)))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nullcontext())
    return compute


def layer_copy(op: int, direction: str, layer: int, staging: int, after=()) -> Copy:
    return Copy(op, direction, LAYER_KV, layer, ((0, 0),), 100, 1, after, staging)


def test_events_ordering_waits_for_the_slots_last_reader_and_the_layer_written(fake_cuda):
    copier = CudaCopier(torch.device("cuda"), EVENTS)
    copier.computed(0, 1, "layer 0 done")
    copier.computed(1, 0, "layer 1 done")
    copier.computed(2, None, "layer 2 done")  # a layer with no CPU blocks: reads no staging slot
    def work():
        pass
    copier.issue(layer_copy(1, H2D, 3, staging=1), work)      # into the slot layer 0 used
    copier.issue(layer_copy(2, D2H, 1, staging=0), work)      # layer 1's write-back
    copier.issue(layer_copy(3, H2D, 4, staging=2), work)      # a slot no layer has used: no compute to wait for
    copier.issue(Copy(4, H2D, BLOCK_KV, None, ((0, 1),), 100, 1), work)  # whole blocks: all compute before it
    copier.issue(layer_copy(5, H2D, 0, staging=0, after=(2,)), work)     # after the write-back of its slot
    h2d, d2h = copier.streams[H2D].waits, copier.streams[D2H].waits
    assert d2h == [("event", "layer 1 done")]
    assert h2d[:3] == [("event", "layer 0 done"), ("stream", "compute"), ("event", "layer 1 done")]
    assert h2d[3][0] == "event" and h2d[3][1] is copier._done[2][1] and len(h2d) == 4


def test_stream_ordering_waits_for_all_compute_issued(fake_cuda):
    copier = CudaCopier(torch.device("cuda"))
    assert copier.ordering == STREAM
    copier.computed(0, 1, "layer 0 done")
    copier.issue(layer_copy(1, H2D, 2, staging=1), lambda: None)
    copier.issue(layer_copy(2, D2H, 0, staging=1), lambda: None)
    assert copier.streams[H2D].waits == copier.streams[D2H].waits == [("stream", "compute")]


def test_an_unknown_ordering_is_refused(fake_cuda):
    with pytest.raises(ValueError, match="copy ordering 'eager': expected one of stream, events"):
        CudaCopier(torch.device("cuda"), "eager")
