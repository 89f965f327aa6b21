"""The copy-engine models against a plain fluid model (the rules of pie_sim/links.py, written the obvious
way): on random copy sequences driven the way the timeline drives them, FluidLinks must give the same
times, rates and busy seconds bit for bit, and FixedRateLinks the same up to rounding where no rate
ever changes; with a disk too, its reads and writes ordered after link copies and link copies after them."""
import dataclasses
import random
import signal
from contextlib import contextmanager

import pytest

from hwmodels import load_hardware
from pie_policy.plan import D2H, H2D, LAYER_KV, Copy
from pie_sim.links import EPSILON, FixedRateLinks, FluidLinks, byte_rates, full_rates, links_for, setup_time, stream_of

from .conftest import DATA

TINY_HW = load_hardware(DATA / "tiny-hw.toml")
TINY_DISK_HW = load_hardware(DATA / "tiny-disk-hw.toml")


class PlainFluidLinks:
    """Every step: start what can start, find the next event among all copies and queue heads, move every
    running copy on to it at the rates of the directions moving, finish what has nothing left to move."""

    def __init__(self, hw):
        self.hw, self.now = hw, 0.0
        self.queues = {}   # stream → [(issue time, copy)]
        self.active = {}   # stream → [copy, end of its latency, bytes left]
        self.started, self.done = {}, {}
        self.busy = dict.fromkeys(full_rates(hw), 0.0)
        self.link_bytes = 0.0  # moved over the link, both directions

    def issue(self, copy, at):
        if at < self.now - EPSILON:
            raise ValueError("issued in the past")
        self.queues.setdefault(stream_of(self.hw, copy), []).append((at, copy))

    def rates(self):
        return byte_rates(self.hw, {c.direction for c, setup, _ in self.active.values() if setup <= self.now + EPSILON})

    def moved_until(self, until):
        before = self.link_bytes
        self.advance(until)
        return self.link_bytes - before

    def idle(self, at):
        self.advance(at)
        return not self.active and not any(self.queues.values())

    def completion(self, op_id):
        while op_id not in self.done:
            if not self.step(float("inf")) and op_id not in self.done:
                raise RuntimeError("never completes")
        return self.done[op_id]

    def advance(self, until):
        while self.step(until):
            pass
        if until > self.now:
            self.move_to(until)
            self.start_ready()

    def step(self, until):
        self.start_ready()
        rates, events = self.rates(), []
        for active in self.active.values():
            copy, setup, left = active
            if setup > self.now + EPSILON:
                events.append(setup)
            else:
                events.append(self.now + left / rates[copy.direction])
                if events[-1] == self.now:   # what is left takes less than the clock resolves: nothing
                    active[2] = 0.0
        events += [queue[0][0] for queue in self.queues.values() if queue and queue[0][0] > self.now + EPSILON]
        t = min(events, default=float("inf"))
        if t > until or t == float("inf"):
            return False
        self.move_to(t)
        return True

    def start_ready(self):
        started = True
        while started:
            started = False
            for stream, queue in self.queues.items():
                if stream not in self.active and queue:
                    at, copy = queue[0]
                    if at <= self.now + EPSILON and all(op in self.done for op in copy.after):
                        queue.pop(0)
                        self.started[copy.op_id] = self.now
                        setup = self.now + setup_time(self.hw, copy)
                        self.active[stream] = [copy, setup, float(copy.nbytes)]
                        started = True
            self.finish()

    def move_to(self, t):
        rates = self.rates()
        for direction in (H2D, D2H):
            if direction in rates:
                self.link_bytes += rates[direction] * (t - self.now)
        for active in self.active.values():
            copy, setup, _ = active
            self.busy[copy.direction] += t - self.now
            if setup <= self.now + EPSILON:
                active[2] -= rates[copy.direction] * (t - self.now)
        self.now = t
        self.finish()

    def finish(self):
        for stream, (copy, setup, left) in list(self.active.items()):
            if setup <= self.now + EPSILON and left <= 1e-9 * max(1.0, copy.nbytes):
                self.done[copy.op_id] = self.now
                del self.active[stream]


def random_link(rng, capped: bool, disk: bool = False):
    """A two-engine link whose bidirectional cap binds (`capped`) or covers both directions; with a disk
    of random speeds (`disk`), or none."""
    h2d, d2h = rng.uniform(1e9, 60e9), rng.uniform(1e9, 60e9)
    both = (h2d + d2h) * (rng.uniform(0.4, 0.95) if capped else rng.uniform(1.0, 1.5))
    link = dataclasses.replace(TINY_HW.link, h2d_bandwidth=h2d, d2h_bandwidth=d2h, bidirectional_bandwidth=both,
                               transfer_latency=rng.choice([0.0, 1e-6, 1e-5]), copy_engines=2)
    if not disk:
        return dataclasses.replace(TINY_HW, link=link)
    ssd = dataclasses.replace(TINY_DISK_HW.disk, read_bandwidth=rng.uniform(1e9, 15e9),
                              write_bandwidth=rng.uniform(1e9, 10e9), transfer_latency=rng.choice([0.0, 2e-5]))
    return dataclasses.replace(TINY_DISK_HW, link=link, disk=ssd)


def drive(models, rng, copies: int, start: float):
    """Issue `copies` random copies (some empty, some without latency, some ordered after earlier ones of
    any direction, the disk's too where there is one) at a clock that moves on as the timeline's does,
    asking every model the same questions; yields each question's answers."""
    t, issued, directions = start, [], list(full_rates(models[0].hw))
    while len(issued) < copies or rng.random() < 0.3:
        action = rng.random()
        if action < 0.5 and len(issued) < copies:
            after = tuple(rng.sample(issued, min(len(issued), rng.choice([0, 0, 1, 2]))))
            nbytes = rng.choice([0, rng.randint(1, 4096), rng.randint(10**5, 10**8)])
            copy = Copy(len(issued), rng.choice(directions), LAYER_KV, 0, (), nbytes, rng.choice([0, 1, 3]), after)
            issued.append(copy.op_id)
            for model in models:
                model.issue(copy, t)
        elif action < 0.65:
            t += rng.choice([0.0, rng.uniform(0, 1e-5), rng.uniform(0, 1e-3)])   # a layer computing
        elif action < 0.8 and issued:
            op = rng.choice(issued)
            yield "completion", [model.completion(op) for model in models]
            t = max(t, max(model.now for model in models))
        elif action < 0.9:
            for model in models:
                model.advance(t)
            t += rng.uniform(0, 1e-4)
            yield "moved_until", [model.moved_until(t) for model in models]
        else:
            t += rng.choice([0.0, rng.uniform(0, 1e-3)])
            yield "idle", [model.idle(t) for model in models]
    t += 10.0
    for model in models:
        model.advance(t)


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_fluid_links_match_the_plain_model_bit_for_bit(seed, disk):
    rng = random.Random(seed)
    hw = random_link(rng, capped=True, disk=disk)
    fast, plain = FluidLinks(hw), PlainFluidLinks(hw)
    assert type(links_for(hw)) is FluidLinks
    for question, (got, want) in drive([fast, plain], rng, copies=60, start=rng.choice([0.0, 1.0, 1234.5])):
        assert got == want, question
        assert (fast.now, fast.busy, fast.started, fast.done) == (plain.now, plain.busy, plain.started, plain.done)
    assert len(fast.done) == 60 and fast.idle(fast.now)


@pytest.mark.parametrize("disk", [False, True])
@pytest.mark.parametrize("seed", range(20))
def test_fixed_rate_links_match_the_plain_model_where_rates_never_change(seed, disk):
    """The cap covers both directions at full speed: the closed form and the stepped model differ only in
    rounding (the stepped one takes bytes off at every event)."""
    rng = random.Random(seed)
    hw = random_link(rng, capped=False, disk=disk)
    fixed, plain = FixedRateLinks(hw), PlainFluidLinks(hw)
    assert type(links_for(hw)) is FixedRateLinks
    for question, (got, want) in drive([fixed, plain], rng, copies=60, start=rng.choice([0.0, 1234.5])):
        if question != "idle":   # asked at a copy's end, rounding decides
            assert got == pytest.approx(want, rel=1e-9, abs=1e-12), question
    assert fixed.started == pytest.approx(plain.started, rel=1e-9, abs=1e-12)
    assert fixed.done == pytest.approx(plain.done, rel=1e-9, abs=1e-12)
    assert fixed.busy == pytest.approx(plain.busy, rel=1e-9, abs=1e-12)


def test_fluid_links_refuse_a_link_with_one_stream():
    hw = dataclasses.replace(TINY_HW, link=dataclasses.replace(TINY_HW.link, copy_engines=1))
    with pytest.raises(ValueError, match="copy_engines"):
        FluidLinks(hw)


def test_a_copy_issued_before_the_clock_is_refused():
    links = FluidLinks(TINY_HW)
    links.advance(1.0)
    with pytest.raises(ValueError, match="before the links' clock"):
        links.issue(Copy(0, H2D, LAYER_KV, 0, (), 100, 1), 0.5)


@contextmanager
def time_limit(seconds: int):
    def stuck(signum, frame):
        raise AssertionError(f"still stepping after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_bytes_left_below_the_clock_resolution_count_as_none():
    """1001 bytes at 10 GB/s from 1234.5 s: the first step leaves 0.001 bytes by rounding (more than the
    1e-9 relative that counts as none), which take less time than the clock resolves at 1234.5 s; were they
    not counted as none, the model would step to the same time forever."""
    now, rate, nbytes = 1234.5, TINY_HW.link.h2d_bandwidth, 1001
    first = now + nbytes / rate
    left = nbytes - rate * (first - now)
    assert left > 1e-9 * nbytes and first + left / rate == first   # the case this is about
    links = FluidLinks(TINY_HW)
    links.advance(now)
    links.issue(Copy(0, H2D, LAYER_KV, 0, (), nbytes, 0), now)
    with time_limit(5):
        assert links.completion(0) == first


def test_an_empty_copy_without_latency_completes_as_it_starts():
    links = FluidLinks(TINY_HW)
    links.advance(2.0)
    links.issue(Copy(0, D2H, LAYER_KV, 0, (), 0, 0), 2.0)
    assert links.completion(0) == 2.0 and links.idle(2.0)
