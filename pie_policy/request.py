"""A request's life in the engine. Times are supplied by the caller: the policy never reads a clock.

A request's tokens are its prompt plus what it has generated; `computed` of them have KV in the cache.
Every step computes some uncomputed tokens and, when it reaches the end, samples one more. After the
prompt's prefill one token is uncomputed (the one just sampled), so a decode is the same step with one
new token. Preemption by recompute resets `computed` to 0 and keeps `generated`: the request resumes
by prefilling its prompt and the tokens it had generated.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class State(Enum):
    WAITING = "waiting"      # not admitted yet, or preempted by recompute
    RUNNING = "running"
    SWAPPED = "swapped"      # preempted, its blocks in CPU swap space
    FINISHED = "finished"
    REJECTED = "rejected"    # can never run; `reason` says why


@dataclass(eq=False, slots=True)
class Request:
    """One request's life: its lengths, state, tokens generated and computed, and the times the policy was
    told (first token, finish). The policy owns it; backends read it."""
    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    state: State = State.WAITING
    generated: int = 0
    computed: int = 0
    preemptions: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"request {self.request_id} needs at least 1 prompt and 1 output token")

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def uncomputed(self) -> int:
        return self.context - self.computed

    @property
    def max_context(self) -> int:
        """Tokens whose KV the request ever holds: the last sampled token's KV is never computed."""
        return self.prompt_tokens + self.output_tokens - 1

    def decode(self, steps: int, now: float) -> bool:
        """Record `steps` decodes at once (each computes the last sampled token and samples the next);
        returns True when the request just finished."""
        if self.computed + 1 != self.prompt_tokens + self.generated or self.generated + steps > self.output_tokens:
            raise ValueError(f"request {self.request_id} cannot decode {steps} tokens now")
        self.computed += steps
        self.generated += steps
        if self.generated == self.output_tokens:
            self.state, self.finish_s = State.FINISHED, now
            return True
        return False

    def advance(self, new_tokens: int, now: float) -> bool:
        """Record a step that computed `new_tokens`; returns True when the request just finished."""
        self.computed += new_tokens
        if self.computed < self.prompt_tokens + self.generated:
            return False  # a prefill chunk: nothing sampled yet
        self.generated += 1
        if self.first_token_s is None:
            self.first_token_s = now
        if self.generated == self.output_tokens:
            self.state, self.finish_s = State.FINISHED, now
            return True
        return False
