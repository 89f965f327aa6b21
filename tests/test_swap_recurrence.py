"""Layer swapping's compact form against the direct one: CPU slots kept as runs against the set they
stand for, records planned from the tables' runs against records planned from every block, and the
timeline's pricing of a record against its pricing of the same plan expanded copy by copy (bit for bit,
on fixed-rate links, fluid links and a link with one copy engine), with the links' memory bounded."""
import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwmodels import CostModel, load_hardware, load_model
from pie_policy.blocks import SlotRuns
from pie_policy.layerswap import runs, span_gaps
from pie_policy.plan import IterationStats
from pie_policy.sizing import build_policy
from pie_sim.links import FixedRateLinks, FluidLinks
from pie_sim.timeline import Timeline


def brute(slots: set[int], gap: int) -> tuple[tuple, int, int]:
    """(runs, groups, spanned) of a set the obvious way: sorted slots, gaps spanned, runs counted."""
    ordered = sorted(slots)
    raw = tuple((start, start + n) for start, _, n in runs([(s, s) for s in ordered]))
    spanned = span_gaps(ordered, gap)
    return raw, len(runs([(s, s) for s in spanned])), len(spanned)


@settings(max_examples=200, deadline=None)
@given(gap=st.integers(0, 4), moves=st.lists(st.integers(0, 40), max_size=120))
def test_slot_runs_follow_the_set_they_stand_for(gap, moves):
    """Each move toggles a slot in or out; after each, the runs, their groups with gaps of at most `gap`
    bridged and the slots those span match the set's (kept as slots come and go, and built at once), and
    the journal lists exactly the slots whose membership changed since it was last read."""
    kept, members, since = SlotRuns(gap, journal=True), set(), set()
    for i, slot in enumerate(moves):
        if slot in members:
            kept.remove(slot)
            members.remove(slot)
        else:
            kept.add(slot)
            members.add(slot)
        since ^= {slot}
        raw, groups, spanned = brute(members, gap)
        assert (kept.runs(), kept.groups, kept.spanned, kept.count) == (raw, groups, spanned, len(members))
        built = SlotRuns.of(members, gap)
        assert (built.runs(), built.groups, built.spanned, built.count) == (raw, groups, spanned, len(members))
        assert set(kept) == members and all((s in kept) == (s in members) for s in range(42))
        assert kept.group_runs() == (brute(set(span_gaps(sorted(members), gap)), 0)[0] if members else ())
        if i % 7 == 0:
            assert kept.take_changes() == since
            since = set()


def test_slot_runs_refuse_what_is_not_a_change():
    kept = SlotRuns()
    kept.add(3)
    with pytest.raises(ValueError, match="already"):
        kept.add(3)
    with pytest.raises(ValueError, match="not in the set"):
        kept.remove(4)


def test_a_journal_left_unread_is_given_up_rather_than_grown():
    kept = SlotRuns(journal=True)
    for _ in range(100):
        kept.add(0)
        kept.remove(0)
    assert kept.take_changes() is None and kept.take_changes() == set()


def expanded(plan):
    """The plan with its layer-swap record expanded into copies: priced the generic way."""
    return dataclasses.replace(plan, layers=tuple(plan.layers)) if plan.swap is not None else plan


def one_engine_link(hw):
    return dataclasses.replace(hw, link=dataclasses.replace(hw.link, copy_engines=1))


@pytest.mark.parametrize("hw, links", [("gh200-96g", FixedRateLinks), ("h100-sxm-pcie5", FluidLinks),
                                       ("one-engine", FixedRateLinks)])
@pytest.mark.parametrize("name", ["pie", "static"])
def test_a_record_is_priced_as_its_copies_are_bit_for_bit(hw, links, name):
    """pie and static under pressure, prefetch depth 2: every plan priced from its record and, on a
    second timeline, from its copies one by one: the same stats exactly, and the same links' clock and
    busy seconds after every plan. The record's links remember only what later plans can name."""
    hardware = one_engine_link(load_hardware("gh200-96g")) if hw == "one-engine" else load_hardware(hw)
    cm = CostModel(hardware, load_model("opt-1.3b"))
    policy = build_policy(name, cm, cpu_mem_bytes=8 * 1024**3, gpu_mem_util=0.05, share=0.5, max_num_seqs=64,
                          prefetch_depth=2)
    rng = random.Random(5)
    for i in range(60):
        policy.add_request(i, 0.0, rng.randint(20, 600), rng.randint(10, 300))
    fast, generic = Timeline(cm), Timeline(cm)
    assert type(fast.links) is links
    now, records, most = 0.0, 0, 0
    while policy.has_work:
        plan = policy.next_iteration()
        records += plan.swap is not None
        got, want = fast.run(plan, now), generic.run(expanded(plan), now)
        assert got == want
        assert (fast.links.now, fast.links.busy) == (generic.links.now, generic.links.busy)
        most = max(most, len(fast.links.done))
        policy.observe(plan, got)
        now = got.end_s
    assert records > 100, "the plans were meant to swap layers"
    assert most <= 4 * policy.swapper.ring + 4 < len(generic.links.done) / 100


@pytest.mark.parametrize("name", ["pie", "static", "prompt-offload"])
@pytest.mark.parametrize("chunked", [False, True])
def test_records_from_the_tables_runs_are_the_records_from_every_block(name, chunked):
    """The policy plans whole batches from the tables' runs of CPU slots (followed through their journal
    from plan to plan) and other batches from their blocks; a twin policy made to gather every plan's
    from the blocks plans the same copies."""
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-1.3b"))

    def make():
        return build_policy(name, cm, cpu_mem_bytes=8 * 1024**3, gpu_mem_util=0.05, share=0.4, max_num_seqs=48,
                            chunked_prefill=chunked, max_num_batched_tokens=512 if chunked else None)

    policy, twin = make(), make()
    twin._layer_swap = lambda schedule, seqs, shape: twin.swapper.plan_seqs(seqs)
    rng = random.Random(11)
    for i in range(50):
        lengths = rng.randint(20, 500), rng.randint(5, 200)
        for p in (policy, twin):
            p.add_request(i, 0.0, *lengths)
    compared = 0
    while policy.has_work:
        plan, other = policy.next_iteration(), twin.next_iteration()
        assert (plan.prologue, tuple(plan.layers), plan.staging_slots) == \
               (other.prologue, tuple(other.layers), other.staging_slots)
        compared += plan.swap is not None
        for p, q in ((policy, plan), (twin, other)):
            p.observe(q, IterationStats.of(q, 0.0, 1.0, 1.0, 0.0))
    assert compared > 50
