"""FIFO layer swapping: a hand-worked op list, and the staging bound replayed independently."""
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pie_policy.blocks import CPU, GPU, BlockRef
from pie_policy.layerswap import FifoLayerSwap, runs
from pie_policy.plan import D2H, H2D, LAYER_KV, Copy, SeqWork


ALL = range(100)  # every sequence of these tests may hold CPU blocks


def seq(request_id, new, cached, blocks):
    return SeqWork(request_id, new, cached, True, tuple(BlockRef(tier, slot) for tier, slot in blocks))


def test_hand_worked_plan_depth_1_dirty_only():
    """4 layers, prefetch depth 1 (2 staging slots), 100-byte layer blocks, 16-token blocks.
    Sequence 0 decodes token 40 (block 2, on CPU slot 8); its block 1 is CPU slot 7.
    Sequence 1 decodes token 10 (block 0, CPU slot 3). Staging positions: 7→0, 8→1, 3→2.
    Prefetch: 3 blocks, 300 B, CPU slots 7,8 | 3 = 2 runs. Write-back: dirty 8 and 3 = 200 B, 2 runs."""
    swap = FifoLayerSwap(num_layers=4, depth=1, capacity=8, block_bytes_layer=100, block_size=16,
                         dirty_only=True, op_ids=count())
    batch = (seq(0, 1, 40, [(GPU, 0), (CPU, 7), (CPU, 8)]), seq(1, 1, 10, [(CPU, 3)]))
    prologue, steps, staging = swap.plan(batch, ALL)
    fetch = ((7, 0), (8, 1), (3, 2))
    back = ((1, 8), (2, 3))
    # Ids in issue order: prefetch L0 = 0; at L0 prefetch L1 = 1, evict L0 = 2; at L1 prefetch L2 = 3
    # (slot 0, after evict L0 = 2), evict L1 = 4; at L2 prefetch L3 = 5 (slot 1, after 4), evict L2 = 6;
    # at L3 evict L3 = 7.
    assert prologue == (Copy(0, H2D, LAYER_KV, 0, fetch, 300, 2),)
    assert [s.issue for s in steps] == [(Copy(1, H2D, LAYER_KV, 1, fetch, 300, 2),),
                                       (Copy(3, H2D, LAYER_KV, 2, fetch, 300, 2, after=(2,)),),
                                       (Copy(5, H2D, LAYER_KV, 3, fetch, 300, 2, after=(4,)),),
                                       ()]
    assert [s.wait for s in steps] == [(0,), (1,), (3,), (5,)]
    assert [s.evict for s in steps] == [(Copy(2, D2H, LAYER_KV, 0, back, 200, 2),),
                                       (Copy(4, D2H, LAYER_KV, 1, back, 200, 2),),
                                       (Copy(6, D2H, LAYER_KV, 2, back, 200, 2),),
                                       (Copy(7, D2H, LAYER_KV, 3, back, 200, 2),)]
    assert staging == fetch
    assert swap.staging_bytes == 2 * 8 * 100

    # The next iteration's first prefetch (slot 0) waits for the last write-back out of slot 0 (layer 2).
    prologue, _, _ = swap.plan(batch, ALL)
    assert prologue[0].after == (6,)


def test_whole_blocks_are_written_back_without_dirty_only():
    swap = FifoLayerSwap(2, 1, 8, 100, 16, dirty_only=False, op_ids=count())
    _, steps, _ = swap.plan((seq(0, 1, 40, [(CPU, 4), (CPU, 5), (GPU, 0)]),), ALL)  # token 40 is in block 2, on GPU
    assert steps[0].evict[0].pairs == ((0, 4), (1, 5)) and steps[0].evict[0].calls == 1
    swap = FifoLayerSwap(2, 1, 8, 100, 16, dirty_only=True, op_ids=count())
    _, steps, _ = swap.plan((seq(0, 1, 40, [(CPU, 4), (CPU, 5), (GPU, 0)]),), ALL)
    assert steps[0].evict == ()  # nothing on the CPU was written


def test_no_cpu_blocks_no_ops_and_capacity_is_enforced():
    swap = FifoLayerSwap(2, 1, 1, 100, 16, True, count())
    assert swap.plan((seq(0, 5, 0, [(GPU, 0)]),), ALL) == ((), (), ())
    with pytest.raises(RuntimeError, match="exceed the staging capacity 1"):
        swap.plan((seq(0, 1, 20, [(CPU, 0), (CPU, 1)]),), ALL)


def test_runs_group_pairs_consecutive_on_both_sides():
    assert runs([]) == [] and runs([(5, 0)]) == [(5, 0, 1)]
    assert runs([(1, 0), (2, 1), (3, 2), (7, 3), (8, 4), (2, 5)]) == [(1, 0, 3), (7, 3, 2), (2, 5, 1)]
    assert runs([(7, 0), (8, 2)]) == [(7, 0, 1), (8, 2, 1)]  # consecutive slots, positions apart


@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 12), depth=st.integers(1, 4), iterations=st.integers(1, 4),
       cpu_blocks=st.lists(st.integers(0, 30), min_size=1, max_size=10, unique=True))
def test_staging_never_exceeds_its_bound(num_layers, depth, iterations, cpu_blocks):
    """Replay issue order: a staging slot is taken by a prefetch and freed by its layer's write-back (or,
    with nothing to write back, once the layer has computed). Never more than depth + 1 slots are taken,
    and a prefetch never lands in a slot whose previous write-back it is not ordered after."""
    capacity = len(cpu_blocks)
    swap = FifoLayerSwap(num_layers, depth, capacity, 64, 16, dirty_only=True, op_ids=count())
    batch = (seq(0, 1, 16 * len(cpu_blocks) - 1, [(CPU, b) for b in cpu_blocks]),)
    holder: dict[int, int] = {}  # staging slot → layer holding it
    pending_evict: dict[int, int] = {}  # staging slot → write-back id not yet known to have finished
    most = 0

    def take(copy: Copy) -> None:
        nonlocal most
        slot = copy.layer % swap.ring
        assert slot not in holder, f"layer {copy.layer} prefetched into slot {slot} held by layer {holder[slot]}"
        if slot in pending_evict:
            assert pending_evict.pop(slot) in copy.after, "prefetch not ordered after the slot's write-back"
        assert len(copy.pairs) <= capacity
        holder[slot] = copy.layer
        most = max(most, len(holder))

    for _ in range(iterations):
        prologue, steps, _ = swap.plan(batch, ALL)
        for copy in prologue:
            take(copy)
        for layer, step in enumerate(steps):
            for copy in step.issue:
                take(copy)
            assert holder.get(layer % swap.ring) == layer, "layer computes without its blocks staged"
            del holder[layer % swap.ring]
            for copy in step.evict:
                pending_evict[layer % swap.ring] = copy.op_id
    assert most <= swap.depth + 1
