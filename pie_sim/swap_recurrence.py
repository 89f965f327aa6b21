"""A layer-swap record (pie_policy.layerswap.LayerSwap) priced without making a `Copy`: `Timeline.run`'s
recurrence, step for step and in the same floating-point order, over the record's arithmetic (every
layer's prefetch and write-back move the same bytes in the same calls; their ids and staging slots
follow from the layer). On fixed-rate links (`price_fixed`) the links' rules are written out too, so a
layer is a few additions and comparisons whatever the blocks it moves; on fluid links (`price_fluid`)
the copies go to the stepped model as plain numbers.

The links keep only what a later plan can still ask for: the completion of the prefetches the next
plan's first layers wait on and of each staging slot's last write-back (the only copies of earlier
plans that layer swapping ever names, layerswap.py); `SwapMemory` forgets the rest of what the records
put there once it is complete, so the links' memory is bounded by what is in flight, not by the run.
"""
from __future__ import annotations

from collections import deque

from pie_policy import IterationStats, Plan
from pie_policy.layerswap import LayerSwap
from pie_policy.plan import D2H, H2D

from .links import FixedRateLinks, FluidLinks


class SwapMemory:
    """Which of the records' copies the links still remember: `kept`, those later plans may name;
    `pending`, those to forget once complete."""

    def __init__(self):
        self.kept: set[int] = set()
        self.pending: list[int] = []

    def keep(self, done: dict, new: dict[int, float], live: set[int]) -> None:
        """Fixed-rate links: enter `new` (op → completion) and forget what was kept before and is not `live`."""
        for op in self.kept - live:
            done.pop(op, None)
        done.update(new)
        self.kept = (self.kept & live) | set(new)

    def forget(self, links: FluidLinks, issued: range, live: set[int]) -> None:
        """Fluid links (which remember every copy): of the copies just `issued` and those kept before, forget
        the ones no later plan names (not `live`) as soon as they are complete."""
        self.pending += [op for op in issued if op not in live]
        self.pending += [op for op in self.kept if op not in live]
        self.kept = live & (self.kept | set(issued))
        waiting = []
        for op in self.pending:
            if op in links.done:
                del links.done[op], links.started[op]
            else:
                waiting.append(op)
        self.pending = waiting


def referenced(swap: LayerSwap) -> set[int]:
    """The copies of `swap` and before that later plans may wait on or be ordered after: the prefetches of
    the next plan's first layers and each staging slot's last write-back."""
    L, live = swap.num_layers, {swap.fetch_op(layer) for layer in range(swap.num_layers - swap.depth, swap.num_layers)}
    last = list(swap.evicted)
    if swap.write is not None:
        for layer in range(max(0, L - swap.ring), L):
            last[swap.slot(layer)] = swap.fetch_op(layer) + 1
    return live | {op for op in last if op is not None}


def price_fluid(links: FluidLinks, cost_model, plan: Plan, swap: LayerSwap, start: float, alone: float, price,
                head: float, memory: SwapMemory) -> IterationStats:
    """As `price_fixed`, on the stepped model: the generic timeline's calls to the links, in the same
    order, with the record's copies queued as numbers."""
    latency = links.hw.link.transfer_latency
    h_slot, d_slot = links.slot_of[H2D], links.slot_of[D2H]
    enqueue, completion, advance = links.enqueue, links.completion, links.advance
    issue_time = cost_model.issue_time
    busy_h0, busy_d0 = links.seconds[h_slot], links.seconds[d_slot]
    L, evicted = swap.num_layers, swap.evicted
    fetch, write = swap.fetch, swap.write
    f_setup, f_issue = fetch.calls * latency, issue_time(fetch.calls)
    if write is not None:
        w_setup, w_issue = write.calls * latency, issue_time(write.calls)
    issuing = 0
    t = start
    for i, (layer, copies) in enumerate(swap.prologue):
        cost = issue_time(copies.calls)
        issuing += cost
        t += cost
        after = evicted[swap.slot(layer)]
        enqueue(h_slot, t, swap.first_op + i, () if after is None else (after,), copies.nbytes, copies.calls * latency)
    computes, stalls = [], []
    for layer in range(L):
        issuing += f_issue
        t += f_issue
        after = swap.fetch_after(layer)
        op = swap.fetch_op(layer)
        enqueue(h_slot, t, op, () if after is None else (after,), fetch.nbytes, f_setup)
        begin = t
        for waited in swap.waits(layer):
            begin = max(begin, completion(waited))
        advance(begin)
        bandwidth = links.moved_until(begin + alone) / alone if alone > 0 else 0.0
        took = price(bandwidth)
        stalls.append(begin - t)
        computes.append(took)
        t = begin + took
        if write is not None:
            issuing += w_issue
            t += w_issue
            enqueue(d_slot, t, op + 1, (), write.nbytes, w_setup)
    advance(t + head)
    memory.forget(links, range(swap.first_op, swap.first_op + swap.copies), referenced(swap))
    return IterationStats(plan.iteration, start, t + head, sum(computes) + head + issuing, sum(stalls),
                          *swap.bytes_moved(), links.seconds[h_slot] - busy_h0, links.seconds[d_slot] - busy_d0,
                          tuple(computes), tuple(stalls))


def price_fixed(links: FixedRateLinks, cost_model, plan: Plan, swap: LayerSwap, start: float, alone: float, price,
                head: float, memory: SwapMemory) -> IterationStats:
    """Price `plan` (whose copies are `swap`'s alone, its bytes theirs) from `start`; `alone` is a layer's time with no copy
    in flight, `price(bandwidth)` with copies moving `bandwidth` bytes/s (timeline.layer_prices), `head`
    the LM head's. (Maxima
    and minima are written out as comparisons: they pick the same floats as `max` and `min`.)"""
    hw = links.hw
    latency = hw.link.transfer_latency
    h_stream, d_stream = (H2D, D2H) if hw.link.copy_engines >= 2 else ("both", "both")
    bw_h, bw_d = links.bandwidth[H2D], links.bandwidth[D2H]
    free, windows, done, busy = links.free, links.windows, links.done, links.busy
    for stream in (h_stream, d_stream):  # in issue order, as the links would add them
        if stream not in windows:
            windows[stream] = deque()
    queues = tuple(windows.values())
    h_window, d_window = windows[h_stream], windows[d_stream]
    issue_time = cost_model.issue_time
    busy_h0, busy_d0 = busy[H2D], busy[D2H]
    L, depth = swap.num_layers, swap.depth
    fetch, write = swap.fetch, swap.write
    f_setup, f_dur, f_issue = fetch.calls * latency, fetch.nbytes / bw_h, issue_time(fetch.calls)
    if write is not None:
        w_setup, w_dur, w_issue = write.calls * latency, write.nbytes / bw_d, issue_time(write.calls)
    evicted = swap.evicted
    issuing = 0
    t, now = start, links.now
    free_h = free.get(h_stream, 0.0)

    prologue_ends = {}
    for layer, copies in swap.prologue:
        cost = issue_time(copies.calls)
        issuing += cost
        t += cost
        after = evicted[swap.slot(layer)]
        begin = t if t >= free_h else free_h
        if after is not None and done[after] > begin:
            begin = done[after]
        moving = begin + copies.calls * latency
        free[h_stream] = free_h = end = moving + copies.nbytes / bw_h
        busy[H2D] += end - begin
        h_window.append((moving, end, bw_h))
        prologue_ends[layer] = prologue_ends.get(layer, ()) + (end,)

    fetched = [0.0] * L
    evicted_end = 0.0
    computes, stalls = [], []
    shared = h_stream == d_stream  # one stream for both directions: a fetch waits on the last write-back
    free_d = free_h if shared else free.get(d_stream, 0.0)
    busy_h, busy_d = busy[H2D], busy[D2H]  # the dicts' sums, carried in locals and stored after the loop
    for layer in range(L):
        # the prefetch issued as the layer is reached, after the last write-back out of its staging slot
        issuing += f_issue
        t += f_issue
        begin = t if t >= free_h else free_h
        if write is not None and layer:
            if evicted_end > begin:
                begin = evicted_end
        else:
            after = evicted[swap.slot(layer + depth)]
            if after is not None and done[after] > begin:
                begin = done[after]
        moving = begin + f_setup
        free_h = end = moving + f_dur
        if shared:
            free_d = end
        busy_h += end - begin
        h_window.append((moving, end, bw_h))
        fetched[layer] = end
        # the layer starts once the prefetches of its blocks are complete
        begin = t
        if layer >= depth:
            if fetched[layer - depth] > begin:
                begin = fetched[layer - depth]
        else:
            carried = swap.carried[layer]
            if carried is not None and done[carried] > begin:
                begin = done[carried]
            for end in prologue_ends.get(layer, ()):
                if end > begin:
                    begin = end
        if begin > now:
            now = begin
        for queue in queues:
            while queue and queue[0][1] <= now:
                queue.popleft()
        bandwidth = 0.0
        if alone > 0:  # the bytes the link moves while the layer computes alone, over that time
            until, moved = begin + alone, 0.0
            for queue in queues:
                for moving, end, rate in queue:
                    if moving >= until:
                        break
                    moved += rate * ((end if end <= until else until) - (moving if moving >= now else now))
            if until > now:
                now = until
            for queue in queues:
                while queue and queue[0][1] <= now:
                    queue.popleft()
            bandwidth = moved / alone
        took = price(bandwidth)
        stalls.append(begin - t)
        computes.append(took)
        t = begin + took
        if write is not None:  # the write-back issued once the layer has computed
            issuing += w_issue
            t += w_issue
            begin = t if t >= free_d else free_d
            moving = begin + w_setup
            free_d = evicted_end = moving + w_dur
            busy_d += evicted_end - begin
            d_window.append((moving, evicted_end, bw_d))
            fetched.append(evicted_end)  # the write-back of this layer: position L + layer
            if shared:
                free_h = evicted_end
    free[h_stream] = free_h
    if write is not None:
        free[d_stream] = free_d
    busy[H2D], busy[D2H] = busy_h, busy_d
    if t + head > now:
        now = t + head
    for queue in queues:
        while queue and queue[0][1] <= now:
            queue.popleft()
    links.now = now

    # what the next plans may still ask the links for
    new = {swap.fetch_op(layer): fetched[layer] for layer in range(L - depth, L)}
    if write is not None:
        new.update((swap.fetch_op(layer) + 1, fetched[L + layer]) for layer in range(max(0, L - swap.ring), L))
    memory.keep(done, new, referenced(swap))
    return IterationStats(plan.iteration, start, t + head, sum(computes) + head + issuing, sum(stalls),
                          *swap.bytes_moved(), busy[H2D] - busy_h0, busy[D2H] - busy_d0, tuple(computes), tuple(stalls))
