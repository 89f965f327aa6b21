"""FlexGen as a policy: offline and throughput-oriented, no continuous batching.

Requests are taken in blocks of the size the LP search (`flexgen_lp.search`) chose for the workload's
mean lengths; a block is prefilled together and then decoded together until its longest request is
done (shorter ones finish early but their rows keep computing, as in FlexGen's padded batches); only
then is the next block taken. Every layer streams in, one layer ahead, the offloaded share of its
weights (1 - wg), of the block's KV cache (1 - cg) and activations (1 - hg), and writes back the
offloaded share of the new KV and outputs once it has computed. Plans carry bytes only (no block
tables): the executor does not run FlexGen.
"""
from __future__ import annotations

from itertools import count

from hwmodels import BatchShape, CostModel

from .flexgen_lp import FlexGenPlacement
from .plan import ACTIVATIONS, D2H, H2D, LAYER_KV, WEIGHTS, Copy, IterationStats, LayerStep, Plan, SeqWork
from .request import Request, State


class FlexGenPolicy:
    name = "flexgen"

    def __init__(self, cost_model: CostModel, placement: FlexGenPlacement):
        self.model, self.placement = cost_model.model, placement
        self.waiting: list[Request] = []
        self.block: list[Request] = []
        self._ids, self._iteration = count(), count()

    def add_request(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int) -> Request:
        request = Request(request_id, arrival_s, prompt_tokens, output_tokens)
        if request.max_context > self.model.max_context:
            request.state = State.REJECTED
            request.reason = f"needs {request.max_context} tokens of context; {self.model.name} has {self.model.max_context}"
        else:
            self.waiting.append(request)
        return request

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.block)

    @property
    def cpu_share(self) -> float:
        return 1.0 - self.placement.cg

    @property
    def kv_bytes(self) -> tuple[int, int]:
        """The block's KV cache, split by the placement's cg."""
        tokens = sum(r.computed for r in self.block)
        total = tokens * self.model.kv_bytes_per_token
        return round(self.placement.cg * total), round((1 - self.placement.cg) * total)

    def next_iteration(self) -> Plan | None:
        if not self.block:
            if not self.waiting:
                return None
            size = self.placement.block_size
            self.block, self.waiting = self.waiting[:size], self.waiting[size:]
            for request in self.block:
                request.state = State.RUNNING
        first = self.block[0].computed == 0
        # The whole block computes, finished rows included; only unfinished ones emit tokens.
        rows = [(r.uncomputed, r.computed) if first else (1, r.prompt_tokens + self._step() - 1) for r in self.block]
        seqs = tuple(SeqWork(r.request_id, new, cached, True, ()) for r, (new, cached) in zip(self.block, rows)
                     if r.state is State.RUNNING)
        shape = BatchShape.of(prefills=rows) if first else BatchShape.of(decodes=[cached for _, cached in rows])
        prologue, layers = self._copies(rows, first)
        return Plan(next(self._iteration), seqs, shape, prologue, layers)

    def _step(self) -> int:
        """Decode steps the block has taken (all rows advance together)."""
        return max(r.generated for r in self.block)

    def _copies(self, rows: list[tuple[int, int]], first: bool):
        p, m = self.placement, self.model
        new = sum(n for n, _ in rows)
        cached = sum(c for _, c in rows)
        act_bytes = new * m.hidden_size * m.dtype_bytes
        loads = {WEIGHTS: (1 - p.wg) * m.layer_weight_bytes,
                 LAYER_KV: 0 if first else (1 - p.cg) * cached * m.kv_bytes_per_token_layer,
                 ACTIVATIONS: (1 - p.hg) * act_bytes}
        stores = {LAYER_KV: (1 - p.cg) * new * m.kv_bytes_per_token_layer, ACTIVATIONS: (1 - p.hg) * act_bytes}

        def copies(direction: str, sizes: dict, layer: int) -> tuple[Copy, ...]:
            return tuple(Copy(next(self._ids), direction, kind, layer, (), round(b), 1) for kind, b in sizes.items()
                         if round(b) > 0)

        fetched = {0: copies(H2D, loads, 0)}
        layers = []
        for layer in range(m.num_layers):
            issue = ()
            if layer + 1 < m.num_layers:
                issue = fetched[layer + 1] = copies(H2D, loads, layer + 1)
            layers.append(LayerStep(issue, tuple(c.op_id for c in fetched[layer]), copies(D2H, stores, layer)))
        if not any(step.issue or step.wait or step.evict for step in layers):
            return (), ()
        return fetched[0], tuple(layers)

    def next_run(self) -> None:
        """No decode runs: FlexGen's iterations are planned one by one (see `Policy.next_run`)."""
        return None

    def observe(self, plan: Plan, stats: IterationStats) -> list[Request]:
        by_id = {r.request_id: r for r in self.block}
        finished = [by_id[s.request_id] for s in plan.seqs if by_id[s.request_id].advance(s.new_tokens, stats.end_s)]
        if all(r.state is State.FINISHED for r in self.block):
            self.block = []
        return finished
