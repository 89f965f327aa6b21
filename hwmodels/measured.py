"""Compute time from a Vidur profile (vidur.py) where it has measurements, from the roofline for the rest.

Measured: the dense part of a layer by token count, attention (when the profile has attention.csv), the
all-reduces (when the hardware entry names the profile's network) and the embedding lookup, each for one
GPU of the tp that split the layer. The roofline (roofline.py, the same entry's figures): attention and
all-reduces the profile lacks, the LM head and the engine's per-iteration host time, which Vidur's compute
profiles do not time. Copies in flight slow a measured layer by the ratio they slow the roofline's kernels.
"""
from __future__ import annotations

from .batch import BatchShape
from .roofline import Roofline
from .vidur import VidurProfile


class MeasuredLayers:
    def __init__(self, profile: VidurProfile, roofline: Roofline):
        self.profile, self.roofline = profile, roofline
        model = roofline.model
        self._message_bytes = model.hidden_size * model.dtype_bytes
        self._per_batch_size: dict[int, tuple[float, float]] = {}

    def all_reduce_time(self, tokens: int) -> float:
        """One all-reduce of `tokens` tokens' hidden states among the tp GPUs (0 for one GPU)."""
        if self.roofline.tp == 1:
            return 0.0
        if self.profile.all_reduce is None:
            return self.roofline.all_reduce_time(tokens)
        return self.profile.all_reduce(tokens * self._message_bytes)

    def attention_time(self, batch: BatchShape) -> float:
        attention = self.profile.attention
        return attention(batch) if attention is not None else self.roofline.attention_time(batch)

    def dense_time(self, tokens: int) -> float:
        """Every part of a layer but attention: the measured dense operators and the all-reduces."""
        return self.profile.dense(tokens) + 2 * self.all_reduce_time(tokens)

    def layer_time(self, batch: BatchShape, copy_bandwidth: float = 0.0) -> float:
        seconds = self.dense_time(batch.tokens) + self.attention_time(batch)
        if copy_bandwidth:
            seconds *= self.roofline.kernel_time(batch, copy_bandwidth) / self.roofline.kernel_time(batch)
        return seconds

    def head_time(self, batch: BatchShape) -> float:
        """The roofline's LM head and host time, and the measured embedding lookup of the batch's tokens."""
        embedding = self.profile.embedding_time(batch.tokens) if batch.tokens else 0.0
        return self.roofline.head_time(batch) + embedding

    def decode_time(self, sequences: int, attended: int) -> float:
        """A whole decode iteration, the parts that depend on the batch size alone computed once per size."""
        known = self._per_batch_size.get(sequences)
        if known is None:
            known = self._per_batch_size[sequences] = (
                self.dense_time(sequences), self.head_time(BatchShape(decode_tokens=sequences, sampled_tokens=sequences)))
        rest, head = known
        attention = self.attention_time(BatchShape(decode_tokens=sequences, attended_pairs=attended,
                                                   kv_tokens_read=attended, decode_kv_tokens=attended))
        return self.roofline.model.num_layers * (rest + attention) + head
