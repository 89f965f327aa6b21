"""Inter-token latency (ITL) as vLLM's benchmark measures it: the time between two consecutive tokens of a
request (every token but each request's first), over all the tokens of a run.

A run emits hundreds of thousands of tokens; keeping one time per token would grow memory with them. The
gaps come in groups instead: every sequence decoding in an iteration emits its token at the iteration's
end, and most of them emitted their previous one at the same earlier time. So each iteration adds one
entry (when, gap, how many tokens) per distinct previous time: as many entries as iterations, a few
more where preemptions or prefill-only iterations left some sequences out, and the exact multiset of
gaps. `percentile` reads a weighted sample exactly as numpy's (linear) percentile reads the expanded one.

Folding costs a few percent of a simulated run, so the serving loop does it
only when asked (`Serving(..., token_gaps=True)`): for benchmark.json and for an SLO on ITL.
"""
from __future__ import annotations

from array import array
from collections import Counter
from operator import attrgetter, sub
from typing import Iterable, Mapping

import numpy as np

from pie_policy.request import Request

_GENERATED = attrgetter("generated")


class TokenGaps:
    """The gaps between consecutive tokens of every request, folded as tokens are emitted."""

    def __init__(self):
        self._index: dict[int, int] = {}    # request id → its place in the two lists below
        self._requests: list[Request] = []  # requests that emitted a token and have more to come
        self._last: list[float] = []        # when each one's last token came
        self._at, self._gap, self._count = array("d"), array("d"), array("q")

    def sampled(self, ids: Iterable[int], at: float, requests: Mapping[int, Request]) -> None:
        """The requests of `ids` (looked up in `requests` at their first token) each emitted one token at
        `at` (an executed plan's sampling sequences)."""
        groups: dict[float, int] = {}
        last, index = self._last, self._index
        for rid in ids:
            i = index.get(rid)
            if i is None:  # its first token: TTFT, no gap
                index[rid] = len(self._requests)
                self._requests.append(requests[rid])
                last.append(at)
            else:
                before = last[i]
                groups[before] = groups.get(before, 0) + 1
                last[i] = at
        for before, count in groups.items():
            self._add(at, at - before, count)

    def generated(self) -> list[int]:
        """Tokens generated so far by each request with tokens to come, for `decoded` after a decode run."""
        return list(map(_GENERATED, self._requests))

    def decoded(self, before: list[int], ends: list[float], sequences: list[int]) -> None:
        """A decode run was committed: every sequence in it decoded in its iterations 0, 1, ... up to the
        tokens it gained since `generated` returned `before`, iteration j (of `sequences[j]` sequences)
        ending at ends[j]."""
        last = self._last
        if sequences[0] == len(last):
            # The usual run: every request with tokens to come is in it; after the first, each iteration's
            # sequences emit their tokens one iteration apart.
            for before_s, count in Counter(last).items():
                self._add(ends[0], ends[0] - before_s, count)
            self._at.extend(ends[1:])
            self._gap.extend(map(sub, ends[1:], ends[:-1]))
            self._count.extend(sequences[1:])
            self._last = [ends[-1]] * len(last)  # those that finished in it leave by `finished`
            return
        first: dict[float, int] = {}    # when their previous token came → sequences
        gained = [0] * (len(ends) + 1)  # sequences that gained k tokens
        for i, (now, was) in enumerate(zip(map(_GENERATED, self._requests), before)):
            if now != was:
                first[last[i]] = first.get(last[i], 0) + 1
                gained[now - was] += 1
                last[i] = ends[now - was - 1]
        for before_s, count in first.items():
            self._add(ends[0], ends[0] - before_s, count)
        still = sum(gained)
        for j in range(1, len(ends)):  # iteration j: a gap of ends[j] - ends[j-1] for each sequence still in
            still -= gained[j]
            if not still:
                break
            self._add(ends[j], ends[j] - ends[j - 1], still)

    def finished(self, requests: Iterable[Request]) -> None:
        """`requests` emitted their last token: forget them."""
        for request in requests:
            i = self._index.pop(request.request_id, None)
            if i is None:
                continue
            moved, time = self._requests.pop(), self._last.pop()
            if i < len(self._requests):  # the last one takes the freed place
                self._requests[i], self._last[i] = moved, time
                self._index[moved.request_id] = i

    def _add(self, at: float, gap: float, count: int) -> None:
        self._at.append(at)
        self._gap.append(gap)
        self._count.append(count)

    def arrays(self, start: float = -np.inf, end: float = np.inf) -> tuple[np.ndarray, np.ndarray]:
        """(gaps, counts) of the tokens emitted within [start, end] (all of them by default)."""
        at, gap, count = (np.frombuffer(a, dtype=a.typecode) if len(a) else np.zeros(0) for a in
                          (self._at, self._gap, self._count))
        keep = (at >= start) & (at <= end)
        return gap[keep].astype(float), count[keep].astype(np.int64)


def percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float | None:
    """The q-th percentile of `values` each repeated `counts` times, as np.percentile (linear) of the
    expanded array; None when there is nothing."""
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    if not values.size:
        return None
    order = np.argsort(values, kind="stable")
    values, ends = values[order], np.cumsum(counts[order])  # sorted, and one past each value's last index
    position = q / 100 * (ends[-1] - 1)
    low, high = np.searchsorted(ends, [np.floor(position), np.ceil(position)], side="right")
    a, b, t = values[low], values[high], position - np.floor(position)
    return float(a + (b - a) * t)


def mean_std(values: np.ndarray, counts: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and (population) standard deviation of `values` each repeated `counts` times."""
    total = counts.sum()
    if not total:
        return None, None
    mean = float((values * counts).sum() / total)
    return mean, float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
