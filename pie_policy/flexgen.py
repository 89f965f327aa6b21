"""FlexGen as a policy: offline and throughput-oriented, no continuous batching.

Requests are taken in blocks of the size the LP search (`flexgen_lp.search`) chose for the workload's
mean lengths; a block is prefilled together and then decoded together until its longest request is
done (shorter ones finish early but their rows keep computing, as in FlexGen's padded batches); only
then is the next block taken. Each layer computes the block's GPU batches one after another (the
zig-zag order: a layer's weights, once in, serve every GPU batch of the block).

Copies run on streams of their own that overlap compute and one another (FlexGen's load and store
streams): every layer brings in the offloaded share of its weights (1 - wg), of the block's KV cache
(1 - cg) and of its activations (1 - hg), and writes back the offloaded share of the KV and outputs it
computed. What lives on disk passes through CPU memory: a layer's disk read is issued two layers ahead
and its copy to the GPU one layer ahead, once the read is done; a write to disk follows the copy to CPU
memory of the same data. A load of the KV cache follows the last write of that layer's cache to where it
reads from (a step cannot read back what the previous one has not written yet), and a layer starts only
once the disk writes of the layer two before it are done (what waits in CPU memory for the disk fits its
double buffer; FlexGen syncs every stream at every layer). So a copy-bound step settles at one layer per
the LP's slowest bound, with the disk, the link and compute on three layers at once. Each step fills its
pipeline afresh (the first layer's loads in the prologue) and drains it (the last layer computes with
nothing left to load), as FlexGen's runtime does: its first stage is the input embedding, too short to
hide the first layer's loads, and its last the LM head. Plans carry bytes only (no block tables): the
executor does not run FlexGen.
"""
from __future__ import annotations

from collections import deque
from itertools import count

from hwmodels import BatchShape, CostModel

from .flexgen_lp import FlexGenPlacement, check_shares
from .plan import (
    ACTIVATIONS,
    D2H,
    DISK_READ,
    DISK_WRITE,
    H2D,
    LAYER_KV,
    WEIGHTS,
    Copy,
    IterationStats,
    LayerStep,
    Plan,
    SeqWork,
)
from .request import Request, State

AHEAD = {DISK_READ: 2, H2D: 1}  # layers ahead of its compute that a layer's data is read from disk, copied to the GPU
WRITTEN_BY = {DISK_READ: DISK_WRITE, H2D: D2H}  # what writes back the KV cache a load reads


class FlexGenPolicy:
    """FlexGen as a `ServingPolicy`: owns the queue and the block of requests it computes, and plans each
    step's copies from the LP's placement."""
    name = "flexgen"
    micro_batches = 1

    def __init__(self, cost_model: CostModel, placement: FlexGenPlacement):
        p = placement
        self._on_gpu = {WEIGHTS: p.wg, LAYER_KV: p.cg, ACTIVATIONS: p.hg}
        self._on_disk = {WEIGHTS: p.wd, LAYER_KV: p.cd, ACTIVATIONS: p.hd}
        check_shares(self._on_gpu.values(), self._on_disk.values())
        self.model, self.placement = cost_model.model, placement
        self.waiting: list[Request] = []
        self.block: list[Request] = []
        self._ids, self._iteration = count(), count()
        self._kv_written: dict[tuple[str, int], int] = {}  # (direction, layer) → the block's last KV store there
        self._disk_writes: deque[tuple[int, ...]] = deque(maxlen=2)  # of the last two layers computed

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
        return self.placement.cpu_shares[1]

    @property
    def kv_bytes(self) -> tuple[int, int]:
        """The block's KV cache in HBM and in CPU memory (what is on disk is in neither)."""
        tokens = sum(r.computed for r in self.block)
        total = tokens * self.model.kv_bytes_per_token
        return round(self.placement.cg * total), round(self.cpu_share * total)

    def next_iteration(self, micro_batch: int = 0) -> Plan | None:
        if not self.block:
            if not self.waiting:
                return None
            size = self.placement.block_size
            self.block, self.waiting = self.waiting[:size], self.waiting[size:]
            self._kv_written = {}
            for request in self.block:
                request.state = State.RUNNING
        step = self._step()
        # The whole block computes, finished rows included; only unfinished ones emit tokens.
        rows = self._rows(step)
        seqs = tuple(SeqWork(r.request_id, new, cached, True, ()) for r, (new, cached) in zip(self.block, rows)
                     if r.state is State.RUNNING)
        size = self.placement.gpu_batch_size
        batches = tuple(_shape(rows[i:i + size], step) for i in range(0, len(rows), size))
        prologue, layers = self._copies(*self._layer_bytes(rows))
        return Plan(next(self._iteration), seqs, _shape(rows, step), prologue, layers, gpu_batches=batches)

    def _step(self) -> int:
        """Decode steps the block has taken (all rows advance together); 0 before its prefill."""
        return max(r.generated for r in self.block)

    def _rows(self, step: int) -> list[tuple[int, int]]:
        """(new, cached) tokens of every row of the block at `step`."""
        return [(r.prompt_tokens, 0) if step == 0 else (1, r.prompt_tokens + step - 1) for r in self.block]

    def _layer_bytes(self, rows: list[tuple[int, int]]) -> tuple[dict[str, int], dict[str, int]]:
        """One layer's data in and out, by kind, wherever it lives."""
        m = self.model
        k, acts = m.kv_bytes_per_token_layer, sum(n for n, _ in rows) * m.hidden_size * m.dtype_bytes
        return ({WEIGHTS: m.layer_weight_bytes, LAYER_KV: sum(c for _, c in rows) * k, ACTIVATIONS: acts},
                {LAYER_KV: sum(n for n, _ in rows) * k, ACTIVATIONS: acts})

    def _copies(self, loads: dict[str, int], stores: dict[str, int]):
        """The prologue and per-layer steps: each layer's loads issued AHEAD of it (in the prologue for the
        first layers), its stores when it ends."""
        L = self.model.num_layers
        prologue, issue, fetched = [], [[] for _ in range(L)], [[] for _ in range(L)]
        for layer in range(L):
            read = {}
            for direction in (DISK_READ, H2D):
                for kind, nbytes in loads.items():
                    share = self._on_disk[kind] if direction == DISK_READ else 1 - self._on_gpu[kind]
                    if round(share * nbytes) <= 0:
                        continue
                    after = (read[kind].op_id,) if direction == H2D and kind in read else ()
                    if kind == LAYER_KV and (WRITTEN_BY[direction], layer) in self._kv_written:
                        after += (self._kv_written[WRITTEN_BY[direction], layer],)
                    copy = Copy(next(self._ids), direction, kind, layer, (), round(share * nbytes), 1, after)
                    at = layer - AHEAD[direction]
                    (prologue if at < 0 else issue[at]).append(copy)
                    if direction == DISK_READ:
                        read[kind] = copy
                    else:
                        fetched[layer].append(copy.op_id)
        layers = []
        for layer in range(L):
            flushed = self._disk_writes[0] if len(self._disk_writes) == 2 else ()  # the layer two before's
            evict = self._stores(stores, layer)
            layers.append(LayerStep(tuple(issue[layer]), tuple(fetched[layer]) + flushed, evict))
            self._disk_writes.append(tuple(c.op_id for c in evict if c.direction == DISK_WRITE))
        if not prologue and not any(step.issue or step.wait or step.evict for step in layers):
            return (), ()
        return tuple(prologue), tuple(layers)

    def _stores(self, stores: dict[str, int], layer: int) -> tuple[Copy, ...]:
        """The offloaded share of what the layer computed to CPU memory, then the disk's share on to disk."""
        to_cpu = {kind: Copy(next(self._ids), D2H, kind, layer, (), round((1 - self._on_gpu[kind]) * nbytes), 1)
                  for kind, nbytes in stores.items() if round((1 - self._on_gpu[kind]) * nbytes) > 0}
        to_disk = tuple(Copy(next(self._ids), DISK_WRITE, kind, layer, (), round(self._on_disk[kind] * nbytes), 1,
                             (to_cpu[kind].op_id,) if kind in to_cpu else ())
                        for kind, nbytes in stores.items() if round(self._on_disk[kind] * nbytes) > 0)
        copies = tuple(to_cpu.values()) + to_disk
        self._kv_written |= {(c.direction, layer): c.op_id for c in copies if c.kind == LAYER_KV}
        return copies

    def observe(self, plan: Plan, stats: IterationStats) -> list[Request]:
        by_id = {r.request_id: r for r in self.block}
        finished = [by_id[s.request_id] for s in plan.seqs if by_id[s.request_id].advance(s.new_tokens, stats.end_s)]
        if all(r.state is State.FINISHED for r in self.block):
            self.block = []
        return finished


def _shape(rows: list[tuple[int, int]], step: int) -> BatchShape:
    return BatchShape.of(prefills=rows) if step == 0 else BatchShape.of(decodes=[cached for _, cached in rows])
