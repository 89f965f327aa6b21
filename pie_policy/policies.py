"""One continuous-batching engine under a placement rule: vllm, vllm-swap, static, pie and prompt-offload
(registry.py says what each does). It implements `DecodeRunPolicy` (interfaces.py): plans go to a backend,
stats come back; a simulator may also take several plain decode iterations at once (`next_run`,
`commit_run`): the same iterations `next_iteration` would plan one by one, when nothing but the tokens
changes in them. FlexGen (`flexgen.py`) and the pipeline policies (`pipeline.py`) implement
`ServingPolicy`; `sizing.build_policy` makes any of them from a cost model.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import count
from typing import Callable

from hwmodels import BatchShape, CostModel

from . import decode_runs
from .batching import Schedule, Scheduler
from .blocks import CPU, GPU, BlockTables, SlotRuns
from .config import ConfigError, EngineConfig
from .expansion import ExpansionController
from .layerswap import FifoLayerSwap, LayerSwap, SwapSteps
from .plan import BLOCK_KV, D2H, H2D, Batch, Copy, DecodeRun, IterationStats, LayerStep, Plan, RunStep, SeqWork
from .registry import ENGINE, EXEC, LIVE_KV, REGISTRY, SWAP_SPACE, names
from .request import Request

POLICIES = names(ENGINE, EXEC)  # the single-engine policies, which both backends run


def work_of(work, tables: BlockTables) -> Batch:
    """The sequences of (request, tokens to compute) pairs, each with its block table after this step's
    allocation (a `Batch`: made into SeqWork only when read)."""
    requests = [r for r, _ in work]
    held = [tables.tables.get(r.request_id, []) for r in requests]
    return Batch([r.request_id for r in requests], [new for _, new in work], [r.computed for r in requests],
                 [r.prompt_tokens + r.generated for r in requests], held, [len(table) for table in held])


def shape_of(seqs) -> BatchShape:
    """The batch shape of `seqs`: a sequence with one new token and some cached is a decode."""
    if isinstance(seqs, Batch):
        new, cached = seqs.new, seqs.cached
    else:
        new, cached = [s.new_tokens for s in seqs], [s.cached_tokens for s in seqs]
    if cached and sum(new) == len(new) and min(cached) > 0:  # decodes alone (most iterations): from sums
        return BatchShape.decoding(len(cached), sum(cached), max(cached))
    return BatchShape.of(prefills=[(n, c) for n, c in zip(new, cached) if n > 1 or c == 0],
                         decodes=[c for n, c in zip(new, cached) if n == 1 and c > 0])


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
        assert policy.placement is not None  # every engine policy has one (registry.py)
        self.name, self.config = name, config
        self.tables = BlockTables(config.num_gpu_blocks, config.num_cpu_blocks, config.coalesce_gap,
                                  journal=policy.cpu_blocks == LIVE_KV)
        self._ids = count()
        placement = policy.placement(self.tables, config, cpu_share, controller)
        adapting = placement.controller if policy.adaptive else None
        # only pie adapts, and its placement (registry._expanding) is moved by an ExpansionController
        assert adapting is None or isinstance(adapting, ExpansionController)
        self.controller = adapting
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
        self._open_run: decode_runs.OpenRun | None = None
        self._pending: dict[int, Schedule] = {}
        self._staging: dict[int, tuple[int, ...]] = {}  # layer 0's staging slot → every layer's

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
        return self._share(self.tables.pools[GPU].num_used, self.tables.pools[CPU].num_used)

    def _share(self, gpu: int, cpu: int) -> float:
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
        prologue: tuple[Copy, ...] = ()
        layers: Sequence[LayerStep] = ()
        staging: tuple[int, ...] = ()
        swap = self._layer_swap(schedule, seqs, shape) if self.swapper else None
        if swap is not None:
            prologue, layers = swap.prologue_copies(), SwapSteps(swap)
            staging = self._staging.get(swap.first_slot) or self._staging.setdefault(swap.first_slot, swap.staging_slots())
        if swaps:  # vLLM swaps before the model runs: layer 0 waits for them
            layers = tuple(layers) or tuple(LayerStep() for _ in range(self.config.num_layers))
            first = layers[0]
            layers = (LayerStep(first.issue, first.wait + tuple(c.op_id for c in swaps), first.evict),) + layers[1:]
        plan = Plan(self._iteration, seqs, shape, swaps + prologue, layers, staging)
        self._pending[plan.iteration] = schedule
        self._iteration += 1
        return plan

    def _layer_swap(self, schedule: Schedule, seqs: Sequence[SeqWork], shape) -> LayerSwap | None:
        """The batch's layer-swap record. A batch of every running sequence reads every CPU block in use
        and, when each computes one token, writes the CPU blocks among the tables' last: both are the
        tables' runs, kept as blocks come and go. Any other batch's are gathered from its blocks."""
        assert self.swapper is not None  # asked only of a policy that swaps layers
        if len(schedule.work) != len(self.scheduler.running):
            if not self.tables.pools[CPU].num_used:  # no CPU block to gather: what `plan` does with none
                self.swapper.skip(1)
                return None
            return self.swapper.plan_seqs(seqs)
        written = self.tables.cpu_tails if shape.tokens == len(seqs) else SlotRuns.of(self.swapper.written(seqs))
        in_use = self.tables.pools[CPU].in_use
        assert in_use is not None  # the CPU pool hands out its lowest slots first, keeping them as runs
        return self.swapper.plan(in_use, written)

    def next_run(self, accepts: Callable[[bool], bool] | None = None) -> DecodeRun | None:
        """The next iterations as one `DecodeRun` when they are plain decodes (see decode_runs.py), else
        None; `accepts(copying)` says whether the backend can take a run that copies, or one that does not
        (default: either). A copying run's iterations prefetch and write back the same CPU blocks as the
        plan before, which must have been a steady one (no prologue: every CPU block already staged). Its
        steps are planned as they are drawn; the requests and blocks change at `commit_run`."""
        copying = self.swapper is not None and self.tables.pools[CPU].num_used > 0
        if accepts is not None and not accepts(copying):
            return None
        if copying:
            in_use = self.tables.pools[CPU].in_use
            assert self.swapper is not None and in_use is not None  # copying: a swapper, and the CPU pool's runs
            if not self.swapper.steady(in_use):
                return None
        planned = decode_runs.plan(self.scheduler, copying)
        if planned is None:
            return None
        steps, self._open_run = planned
        if copying:
            steps = self._copying(steps)
        return DecodeRun(self._iteration, steps, self.config.block_bytes, self.tables.pools[CPU].num_used, copying,
                         self._observe_run if self.controller is not None and copying else None)

    def _copying(self, steps):
        """A copying run's steps with each iteration's layer-swap record, planned as the step is drawn."""
        wanted, written = self.tables.pools[CPU].in_use, self.tables.cpu_tails
        for step in steps:
            yield step._replace(swap=self.swapper.plan(wanted, written),
                                cpu_share=self._share(step.gpu_blocks, wanted.count - step.cpu_freed))

    def _observe_run(self, stats: IterationStats, step: RunStep) -> bool:
        """A copying run's iteration to the controller, as `observe` gives it a plan of every running
        sequence (its CPU share while it runs; nothing refused); whether the share held (else the run ends
        after it)."""
        assert self.controller is not None  # a run observes only with a controller (`next_run`)
        share = self.controller.share
        self._tell(stats, False, self._share(step.gpu_blocks_during, self.tables.pools[CPU].num_used), step.shape)
        return self.controller.share == share

    def commit_run(self, run: DecodeRun, ends) -> list[Request]:
        """Account for the first len(ends) iterations of `run`, iteration j ending at ends[j]; returns the
        requests that finished. A copying run's iterations were told to the controller as they ran; a plain
        run's hold no CPU KV and the share refuses nothing in them, so the controller, which such
        iterations leave unchanged, is not told about them."""
        iterations = len(ends)
        if self._open_run is None or run.first_iteration != self._iteration or iterations < 1:
            raise ValueError(f"cannot commit {iterations} iterations of a run that is not the one open")
        opened, self._open_run = self._open_run, None
        self._iteration += iterations
        if self.swapper and not run.copies:
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
        assert self.cost_model is not None  # a controller comes with a cost model (`__init__`)
        price = self.cost_model.iteration_time
        self._refused_s += sum(price(BatchShape.of(prefills=[(tokens, 0)])) - self._fixed_s
                               for tokens in schedule.refused if tokens)
        if len(schedule.work) == len(self.scheduler.running):
            self._tell(stats, schedule.limited, self.cpu_share, plan.shape)

    def _tell(self, stats: IterationStats, limited: bool, in_use: float, shape: BatchShape) -> None:
        """One iteration of every running sequence to the controller: its stats, whether the share refused
        a block, the CPU share of the live KV, the batch's copy-free price and the recomputation refused."""
        assert self.controller is not None and self.cost_model is not None  # told only with both (`__init__`)
        self.controller.observe(stats, limited=limited, in_use=in_use, copy_free_s=self.cost_model.iteration_time(shape),
                                fixed_s=self._fixed_s, refused_s=self._refused_s)
        self._refused_s = 0.0
