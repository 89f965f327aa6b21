"""One continuous-batching engine under a placement rule: vllm, vllm-swap, static, pie and prompt-offload
(registry.py says what each does). It implements `DecodeRunPolicy` (interfaces.py): plans go to a backend,
stats come back; a simulator may also take several plain decode iterations at once (`next_run`,
`commit_run`): the same iterations `next_iteration` would plan one by one, when nothing but the tokens
changes in them. FlexGen (`flexgen.py`) and the pipeline policies (`pipeline.py`) implement
`ServingPolicy`; `sizing.build_policy` makes any of them from a cost model.
"""
from __future__ import annotations

from itertools import count

from hwmodels import BatchShape, CostModel

from . import decode_runs
from .batching import Schedule, Scheduler
from .blocks import CPU, GPU, BlockTables
from .config import ConfigError, EngineConfig
from .expansion import ExpansionController
from .layerswap import FifoLayerSwap
from .plan import BLOCK_KV, D2H, H2D, Copy, DecodeRun, IterationStats, LayerStep, Plan, SeqWork
from .registry import ENGINE, EXEC, REGISTRY, SWAP_SPACE, names
from .request import Request

POLICIES = names(ENGINE, EXEC)  # the single-engine policies, which both backends run


def work_of(work, tables: BlockTables) -> tuple[SeqWork, ...]:
    """SeqWork for each (request, tokens to compute) with its block table after this step's allocation."""
    return tuple(SeqWork(r.request_id, new, r.computed, r.computed + new == r.context, tuple(tables.table(r.request_id)))
                 for r, new in work)


def shape_of(seqs) -> BatchShape:
    """The batch shape of `seqs`: a sequence with one new token and some cached is a decode."""
    return BatchShape.of(prefills=[(s.new_tokens, s.cached_tokens) for s in seqs if s.new_tokens > 1 or s.cached_tokens == 0],
                         decodes=[s.cached_tokens for s in seqs if s.new_tokens == 1 and s.cached_tokens > 0])


class Policy:
    """One engine: owns the block tables, the scheduler (its queues), the placement it asks where new
    blocks go and, when CPU blocks hold live KV, the layer-swap planner; it turns each schedule into a
    `Plan` and each `IterationStats` into the requests' progress (and the controller's next share)."""
    micro_batches = 1

    def __init__(self, name: str, config: EngineConfig, cpu_share: float = 0.0,
                 controller: ExpansionController | None = None, cost_model: CostModel | None = None):
        if name not in POLICIES:
            raise ConfigError(f"unknown policy '{name}' (known: {', '.join(POLICIES)})")
        policy = REGISTRY[name]
        self.name, self.config = name, config
        self.tables = BlockTables(config.num_gpu_blocks, config.num_cpu_blocks)
        self._ids = count()
        placement = policy.placement(self.tables, config, cpu_share, controller)
        self.controller = placement.controller if policy.adaptive else None
        if self.controller is not None and cost_model is None:
            raise ConfigError(f"{name}'s controller prices each batch without copies: it needs the cost model")
        self.cost_model = cost_model
        self._fixed_s = cost_model.iteration_time(BatchShape()) if cost_model else 0.0  # what no batch changes
        self._refused_s = 0.0  # recomputation the share caused since the controller last saw an iteration
        if policy.cpu_blocks == SWAP_SPACE and config.num_cpu_blocks == 0:
            raise ConfigError(f"{name} needs CPU swap space: num_cpu_blocks must be at least 1")
        self.swapper = FifoLayerSwap(config.num_layers, config.prefetch_depth, config.num_cpu_blocks,
                                     config.block_bytes_layer, config.block_size, config.dirty_only_writeback,
                                     self._ids, config.coalesce_gap) if placement.live_cpu else None
        self.scheduler = Scheduler(config, self.tables, placement, swap_preemption=policy.swap_preemption)
        self._iteration = 0  # the next plan's number
        self._open_run: tuple | None = None
        self._pending: dict[int, Schedule] = {}

    # ---- requests
    def add_request(self, request_id: int, arrival_s: float, prompt_tokens: int, output_tokens: int) -> Request:
        """Queue a request; it comes back with state REJECTED and a reason if it can never run."""
        request = Request(request_id, arrival_s, prompt_tokens, output_tokens)
        self.scheduler.add(request)
        return request

    def refusal(self, max_context: int) -> str:
        """Why a request holding up to `max_context` tokens of KV could never run ("" if it can)."""
        return self.scheduler.refusal(max_context)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def cpu_share(self) -> float:
        """Share of the live KV blocks currently in CPU memory."""
        gpu, cpu = self.tables.pools[GPU].num_used, self.tables.pools[CPU].num_used
        return cpu / (gpu + cpu) if self.swapper and gpu + cpu else 0.0

    @property
    def staging_slots(self) -> int:
        """Staging slots the GPU needs for layer swapping (none for the GPU-only policies)."""
        return self.swapper.ring if self.swapper else 0

    @property
    def kv_bytes(self) -> tuple[int, int]:
        """KV bytes held on the GPU and in CPU memory (live or swapped)."""
        pools, block = self.tables.pools, self.config.block_bytes
        return pools[GPU].num_used * block, pools[CPU].num_used * block

    # ---- iterations
    def next_iteration(self, micro_batch: int = 0) -> Plan | None:
        schedule = self.scheduler.schedule()
        if not schedule.work:
            return None
        seqs = work_of(schedule.work, self.tables)
        shape = shape_of(seqs)
        swaps = self._block_swaps(schedule)
        prologue, layers, staging = self.swapper.plan(seqs, self.tables.cpu_holders) if self.swapper else ((), (), ())
        if swaps:  # vLLM swaps before the model runs: layer 0 waits for them
            layers = layers or tuple(LayerStep() for _ in range(self.config.num_layers))
            first = layers[0]
            layers = (LayerStep(first.issue, first.wait + tuple(c.op_id for c in swaps), first.evict),) + layers[1:]
        plan = Plan(self._iteration, seqs, shape, swaps + prologue, layers, staging)
        self._pending[plan.iteration] = schedule
        self._iteration += 1
        return plan

    def next_run(self) -> DecodeRun | None:
        """The next iterations as one `DecodeRun` when they are plain decodes (see decode_runs.py), else
        None. Nothing changes until `commit_run`."""
        planned = decode_runs.plan(self.scheduler, self._iteration)
        if planned is None:
            return None
        run, self._open_run = planned
        return run

    def commit_run(self, run: DecodeRun, ends) -> list[Request]:
        """Account for the first len(ends) iterations of `run`, iteration j ending at ends[j]; returns the
        requests that finished. Its iterations hold no CPU KV and the share refuses nothing in them, so the
        controller, which such iterations leave unchanged, is not told about them."""
        iterations = len(ends)
        if self._open_run is None or run.first_iteration != self._iteration or iterations < 1:
            raise ValueError(f"cannot commit {iterations} iterations of a run that is not the one open")
        opened, self._open_run = self._open_run, None
        self._iteration += iterations
        if self.swapper:
            self.swapper.skip(iterations)
        return decode_runs.commit(self.scheduler, opened, iterations, ends)

    def _block_swaps(self, schedule: Schedule) -> tuple[Copy, ...]:
        """Whole-block copies, one call per block per layer as vLLM's swap issues them."""
        c, copies = self.config, []
        for direction, pairs in ((D2H, schedule.swap_out), (H2D, schedule.swap_in)):
            if pairs:
                copies.append(Copy(next(self._ids), direction, BLOCK_KV, None, tuple(pairs),
                                   len(pairs) * c.block_bytes, len(pairs) * c.num_layers))
        return tuple(copies)

    def observe(self, plan: Plan, stats: IterationStats) -> list[Request]:
        """Account for an executed plan; returns the requests that finished in it."""
        schedule = self._pending.pop(plan.iteration)
        if self.controller is not None:
            self._observe_share(plan, stats, schedule)
        return self.scheduler.complete(schedule, stats.end_s)

    def _observe_share(self, plan: Plan, stats: IterationStats, schedule: Schedule) -> None:
        """Tell the controller about an iteration of every running sequence (only such a batch streams all
        the CPU-resident KV it measures), with the cost model's prices of the batch without copies and of
        recomputing what the preemptions its share caused since the last one threw away."""
        price = self.cost_model.iteration_time
        self._refused_s += sum(price(BatchShape.of(prefills=[(tokens, 0)])) - self._fixed_s
                               for tokens in schedule.refused if tokens)
        if len(schedule.work) == len(self.scheduler.running):
            self.controller.observe(stats, limited=schedule.limited, in_use=self.cpu_share,
                                    copy_free_s=price(plan.shape), fixed_s=self._fixed_s, refused_s=self._refused_s)
            self._refused_s = 0.0
