"""FIFO layer swapping: a hand-worked op list, and the staging bound replayed independently."""
from itertools import count

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pie_policy.blocks import CPU, GPU, BlockRef
from pie_policy.config import ConfigError
from pie_policy.layerswap import FifoLayerSwap, runs, span_gaps
from pie_policy.plan import D2H, H2D, LAYER_KV, Copy, SeqWork


def seq(request_id, new, cached, blocks):
    return SeqWork(request_id, new, cached, True, tuple(BlockRef(tier, slot) for tier, slot in blocks))


def planned(swap, batch):
    """(prologue, per-layer steps, staging slot per layer) of the batch's plan, expanded into copies."""
    record = swap.plan_seqs(batch)
    return ((), (), ()) if record is None else (record.prologue_copies(), record.steps(), record.staging_slots())


def test_hand_worked_plan_depth_1_dirty_only():
    """4 layers, prefetch depth 1 (2 staging slots, layer l of the first plan in slot l % 2), 100-byte
    layer blocks, 16-token blocks. Sequence 0 decodes token 40 (block 2, CPU slot 8); its block 1 is CPU
    slot 7. Sequence 1 decodes token 10 (block 0, CPU slot 3). Blocks keep their CPU slot as staging row.
    Prefetch: 3 blocks, 300 B, slots 3 | 7,8 = 2 calls. Write-back: dirty 3 and 8, 200 B, 2 calls."""
    swap = FifoLayerSwap(num_layers=4, depth=1, capacity=8, block_bytes_layer=100, block_size=16,
                         dirty_only=True, op_ids=count())
    batch = (seq(0, 1, 40, [(GPU, 0), (CPU, 7), (CPU, 8)]), seq(1, 1, 10, [(CPU, 3)]))
    prologue, steps, slots = planned(swap, batch)
    fetch = ((3, 3), (7, 7), (8, 8))
    back = ((3, 3), (8, 8))
    # Ids in issue order: prologue L0 = 0; at L0 prefetch L1 = 1 (slot 1), evict L0 = 2 (slot 0); at L1
    # prefetch L2 = 3 (slot 0, after evict 2), evict L1 = 4; at L2 prefetch L3 = 5 (slot 1, after 4),
    # evict L2 = 6; at L3 prefetch the NEXT plan's L0 = 7 (slot 0, after 6), evict L3 = 8.
    assert prologue == (Copy(0, H2D, LAYER_KV, 0, fetch, 300, 2, (), 0),)
    assert [s.issue for s in steps] == [(Copy(1, H2D, LAYER_KV, 1, fetch, 300, 2, (), 1),),
                                       (Copy(3, H2D, LAYER_KV, 2, fetch, 300, 2, (2,), 0),),
                                       (Copy(5, H2D, LAYER_KV, 3, fetch, 300, 2, (4,), 1),),
                                       (Copy(7, H2D, LAYER_KV, 0, fetch, 300, 2, (6,), 0),)]
    assert [s.wait for s in steps] == [(0,), (1,), (3,), (5,)]
    assert [s.evict for s in steps] == [(Copy(2, D2H, LAYER_KV, 0, back, 200, 2, (), 0),),
                                       (Copy(4, D2H, LAYER_KV, 1, back, 200, 2, (), 1),),
                                       (Copy(6, D2H, LAYER_KV, 2, back, 200, 2, (), 0),),
                                       (Copy(8, D2H, LAYER_KV, 3, back, 200, 2, (), 1),)]
    assert slots == (0, 1, 0, 1)
    assert swap.staging_bytes == 2 * 8 * 100

    # The same batch again: layer 0 waits on the prefetch the first plan issued for it; no prologue.
    prologue, steps, slots = planned(swap, batch)
    assert prologue == () and steps[0].wait == (7,) and slots == (0, 1, 0, 1)
    carried = steps[3].issue[0]
    # A new CPU block (slot 9): only it is fetched before layer 0, which waits on both prefetches.
    grown = (seq(0, 1, 40, [(GPU, 0), (CPU, 7), (CPU, 8)]), seq(1, 1, 16, [(CPU, 3), (CPU, 9)]))
    prologue, steps, _ = planned(swap, grown)
    assert [(c.pairs, c.layer, c.staging) for c in prologue] == [(((9, 9),), 0, 0)]
    assert steps[0].wait == (carried.op_id, prologue[0].op_id)


def test_whole_blocks_are_written_back_without_dirty_only():
    swap = FifoLayerSwap(2, 1, 8, 100, 16, dirty_only=False, op_ids=count())
    _, steps, _ = planned(swap, (seq(0, 1, 40, [(CPU, 4), (CPU, 5), (GPU, 0)]),))  # token 40 is in block 2, on GPU
    assert steps[0].evict[0].pairs == ((4, 4), (5, 5)) and steps[0].evict[0].calls == 1
    swap = FifoLayerSwap(2, 1, 8, 100, 16, dirty_only=True, op_ids=count())
    _, steps, _ = planned(swap, (seq(0, 1, 40, [(CPU, 4), (CPU, 5), (GPU, 0)]),))
    assert steps[0].evict == ()  # nothing on the CPU was written


def test_no_cpu_blocks_no_ops_and_nothing_carried_over():
    swap = FifoLayerSwap(2, 1, 4, 100, 16, True, count())
    planned(swap, (seq(0, 1, 20, [(CPU, 0), (CPU, 1)]),))
    assert planned(swap, (seq(0, 5, 0, [(GPU, 0)]),)) == ((), (), ())
    prologue, steps, _ = planned(swap, (seq(0, 1, 20, [(CPU, 0), (CPU, 1)]),))
    assert len(prologue) == 1 and steps[0].wait == (prologue[0].op_id,)  # the old carry is stale


def test_runs_group_pairs_consecutive_on_both_sides():
    assert runs([]) == [] and runs([(5, 0)]) == [(5, 0, 1)]
    assert runs([(1, 0), (2, 1), (3, 2), (7, 3), (8, 4), (2, 5)]) == [(1, 0, 3), (7, 3, 2), (2, 5, 1)]
    assert runs([(7, 0), (8, 2)]) == [(7, 0, 1), (8, 2, 1)]  # consecutive slots, positions apart


@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(2, 12), depth=st.integers(1, 4), iterations=st.integers(1, 4),
       cpu_blocks=st.lists(st.integers(0, 30), min_size=1, max_size=10, unique=True))
def test_staging_never_exceeds_its_bound(num_layers, depth, iterations, cpu_blocks):
    """Replay issue order over several plans: a prefetch takes a staging slot for one (global) layer,
    its write-back or the layer's compute frees it. Never more than depth + 1 slots are taken, a slot
    never holds two layers, a prefetch is ordered after the last write-back out of its slot, and after
    the write-back of what the previous iteration's same layer wrote (its own `after`, or a later
    write-back: one direction's copies complete in issue order)."""
    assume(depth < num_layers)
    swap = FifoLayerSwap(num_layers, depth, 31, 64, 16, dirty_only=True, op_ids=count())
    batch = (seq(0, 1, 16 * len(cpu_blocks) - 1, [(CPU, b) for b in sorted(cpu_blocks)]),)
    holder: dict[int, int] = {}         # staging slot → global layer it holds
    pending_evict: dict[int, int] = {}  # staging slot → its last write-back
    written: dict[int, int] = {}        # global layer → its write-back's place in device→host issue order
    order: dict[int, int] = {}          # write-back id → its place in device→host issue order
    most = 0

    def take(copy: Copy, layer: int) -> None:
        nonlocal most
        assert copy.staging == layer % swap.ring
        assert holder.get(copy.staging, layer) == layer, f"layer {layer} prefetched into a slot still in use"
        if copy.staging in pending_evict:
            assert pending_evict[copy.staging] in copy.after, "prefetch not ordered after the slot's write-back"
        if layer - num_layers >= 0:
            assert layer - num_layers in written, "prefetch issued before the write-back of the data it reads"
            assert max((order[op] for op in copy.after if op in order), default=-1) >= written[layer - num_layers], \
                "prefetch not ordered after the write-back of the data it reads"
        assert max(src for src, _ in copy.pairs) < swap.capacity
        holder[copy.staging] = layer
        most = max(most, len(holder))

    for k in range(iterations):
        base = k * num_layers
        prologue, steps, slots = planned(swap, batch)
        for copy in prologue:
            take(copy, base + copy.layer)
        for layer, step in enumerate(steps):
            for copy in step.issue:
                take(copy, base + layer + swap.depth)
            assert holder.get(slots[layer]) == base + layer, "layer computes without its blocks staged"
            del holder[slots[layer]]
            for copy in step.evict:
                pending_evict[copy.staging] = copy.op_id
                order[copy.op_id] = written[base + layer] = len(order)
    assert most <= swap.depth + 1


def test_a_prefetch_depth_of_the_layer_count_is_refused():
    """At depth L the prefetch of the next iteration's layer l would be issued before this iteration's layer
    l computes, so before the write-back of its new tokens: it would read stale KV."""
    with pytest.raises(ConfigError, match="prefetch depth 4 must be less than the model's 4 layers"):
        FifoLayerSwap(4, 4, 31, 64, 16, dirty_only=True, op_ids=count())


def test_prefetches_span_small_gaps_write_backs_do_not():
    """The hand-worked batch above (CPU slots 3 | 7, 8; dirty 3 and 8) with coalesce_gap 3: the prefetch
    spans free slots 4-6 (600 B, 1 call instead of 2); the write-back still moves only 3 and 8 (2 calls).
    With a gap of 2 nothing is spanned."""
    batch = (seq(0, 1, 40, [(GPU, 0), (CPU, 7), (CPU, 8)]), seq(1, 1, 10, [(CPU, 3)]))
    swap = FifoLayerSwap(4, 1, 9, 100, 16, dirty_only=True, op_ids=count(), coalesce_gap=3)
    prologue, steps, _ = planned(swap, batch)
    fetch = tuple((s, s) for s in range(3, 9))
    assert (prologue[0].pairs, prologue[0].nbytes, prologue[0].calls) == (fetch, 600, 1)
    assert all((s.issue[0].pairs, s.issue[0].nbytes, s.issue[0].calls) == (fetch, 600, 1) for s in steps)
    assert all((s.evict[0].pairs, s.evict[0].nbytes, s.evict[0].calls) == (((3, 3), (8, 8)), 200, 2) for s in steps)
    swap = FifoLayerSwap(4, 1, 9, 100, 16, dirty_only=True, op_ids=count(), coalesce_gap=2)
    assert planned(swap, batch)[0][0].calls == 2


def test_span_gaps():
    assert span_gaps([], 4) == [] and span_gaps([5], 4) == [5]
    assert span_gaps([1, 2, 5, 11, 12], 2) == [1, 2, 3, 4, 5, 11, 12]
    assert span_gaps([1, 3], 0) == [1, 3]
