"""The shape of one iteration's batch, reduced to the sums that FLOPs and HBM bytes are linear in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class BatchShape:
    """What one iteration computes. Sums, not lists, so costing a batch is O(1) however large it is.

    prefill_tokens: new prompt tokens computed this iteration (all sequences together).
    decode_tokens:  sequences generating one token each.
    attended_pairs: Σ over every new token of the positions it attends to (causal, itself included).
    kv_tokens_read: Σ over sequences of the tokens whose K and V attention reads (cached + new).
    sampled_tokens: tokens that go through the LM head (one per sequence in the batch).
    padded_keys:    sequences × the longest sequence's keys, and
    padded_pairs:   sequences × its most new tokens × its longest keys: what attention touches when every
                    sequence is padded to the longest (the executor's one SDPA call per layer does that;
                    a paged kernel does not, and the roofline leaves these out).
    decode_kv_tokens: Σ over decoding sequences of the tokens their attention reads (cached + new), which
                    is also their share of attended_pairs and kv_tokens_read: the rest is the prefills'
                    (decode and prefill attention run as different kernels at different speeds).
    """
    prefill_tokens: int = 0
    decode_tokens: int = 0
    attended_pairs: int = 0
    kv_tokens_read: int = 0
    sampled_tokens: int = 0
    padded_keys: int = 0
    padded_pairs: int = 0
    decode_kv_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @classmethod
    def decoding(cls, sequences: int, cached: int, longest: int) -> "BatchShape":
        """`of(decodes=...)` from its sums: `sequences` decodes with `cached` tokens cached in all, the
        longest `longest` (an iteration of decodes alone, made without a list)."""
        attended = cached + sequences
        return cls(0, sequences, attended, attended, sequences, sequences * (longest + 1), sequences * (longest + 1),
                   attended)

    @classmethod
    def of(cls, prefills: Iterable[tuple[int, int]] = (), decodes: Iterable[int] = ()) -> "BatchShape":
        """From per-sequence lengths: `prefills` as (new tokens, tokens already cached), `decodes` as
        the number of tokens already cached for each decoding sequence."""
        prefill_tokens = attended = read = sampled = most_new = most_keys = 0
        for new, cached in prefills:
            if new < 1 or cached < 0:
                raise ValueError(f"prefill needs new >= 1 and cached >= 0 tokens, got ({new}, {cached})")
            prefill_tokens += new
            attended += new * cached + new * (new + 1) // 2
            read += cached + new
            sampled += 1
            most_new, most_keys = max(most_new, new), max(most_keys, cached + new)
        decode_tokens = decode_read = 0
        for cached in decodes:
            if cached < 1:
                raise ValueError(f"a decoding sequence has at least one cached token, got {cached}")
            decode_tokens += 1
            decode_read += cached + 1
            attended += cached + 1
            read += cached + 1
            sampled += 1
            most_new, most_keys = max(most_new, 1), max(most_keys, cached + 1)
        return cls(prefill_tokens, decode_tokens, attended, read, sampled, sampled * most_keys,
                   sampled * most_new * most_keys, decode_read)
