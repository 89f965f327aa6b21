"""Measured compute times of one model on one machine: the optional `[fit]` section of a hardware TOML
that `pie-exec calibrate` writes, and the least-squares fits it is made with.

Where a hardware entry has `[fit]`, the cost model takes a layer's and the head's time from it instead of
the roofline (the rest of the entry — memory, link — is used as ever). Each is a measured curve of the
matrix products (interpolated) plus a part linear in the sums of `BatchShape`:

    layer_time = dense(tokens)
                 + layer + per_prefill_token · prefill_tokens + per_decode_token · decode_tokens
                 + per_attended_pair · attended_pairs + per_kv_token_read · kv_tokens_read
                 + per_padded_key · padded_keys + per_padded_pair · padded_pairs,
                 × (1 + copy_slowdown_per_gb_s · copy GB/s in flight)
    head_time  = lm_head(sampled_tokens) + head + per_sampled_token · sampled_tokens + per_token · tokens
    issue_time = copy_issue + copy_issue_per_call · calls          (each copy issued, on the compute clock)

`dense` is a layer without its attention (norms, projections, MLP) by the batch's tokens and `lm_head`
the LM head and sampling by sampled tokens, each measured at a list of counts and interpolated linearly
between them (beyond the last, along the last segment). They are curves, not coefficients, because matrix
products of a few rows are not linear in the rows: on a CPU an OPT-125M layer of 3 tokens took 4.9 ms
and of 4 tokens 3.2 ms, its LM head 39 ms for 3 and 24 ms for 4 (the BLAS switches kernels). Absent, they
are zero and the linear part carries everything. The linear part is the rest: attention, whose work
follows the sums (prefill and decode tokens apart, since a decode token is a sequence of its own in
attention; the padded sums because the executor's attention pads every sequence to the batch's longest),
and for the head everything else outside the layers (binding the batch, embedding). Values are in µs and
belong to one model architecture at one dtype: a profile used with another model is refused. `threads` is
the host's torch thread count during calibration: CPU times depend on it, so `pie-validate` runs
with it.

`issue_time` is what issuing a copy costs the compute clock, beyond the copy's own time on the link: on
the CPU executor ~0.1 ms, mostly the copier thread waking and taking the GIL from the layers (calibrate
measures it as the difference that issuing makes to a run of layers). Profiles without it pay nothing.
"""
from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

import numpy as np

from .batch import BatchShape
from .models import ModelSpec
from .spec import UNITS, CatalogError, curve, quantity, text

# Coefficient field → the BatchShape sum it multiplies (None: a constant per layer or per iteration).
LAYER_TERMS = {"layer": None, "per_prefill_token": "prefill_tokens", "per_decode_token": "decode_tokens",
               "per_attended_pair": "attended_pairs", "per_kv_token_read": "kv_tokens_read",
               "per_padded_key": "padded_keys", "per_padded_pair": "padded_pairs"}
HEAD_TERMS = {"head": None, "per_sampled_token": "sampled_tokens", "per_token": "tokens"}
# Curve field → the BatchShape count it is measured over (dense adds to layer_time, lm_head to head_time).
CURVES = {"dense": "tokens", "lm_head": "sampled_tokens"}


def _us(key: str):
    return quantity(key, "us", positive=False)


@dataclass(frozen=True)
class ComputeFit:
    model: str = text("model")
    architecture: str = text("architecture")
    threads: int = quantity("threads", whole=True)
    layer: float = _us("layer_us")
    per_prefill_token: float = _us("layer_us_per_prefill_token")
    per_decode_token: float = _us("layer_us_per_decode_token")
    per_attended_pair: float = _us("layer_us_per_attended_pair")
    per_kv_token_read: float = _us("layer_us_per_kv_token_read")
    per_padded_key: float = _us("layer_us_per_padded_key")
    per_padded_pair: float = _us("layer_us_per_padded_pair")
    head: float = _us("head_us")
    per_sampled_token: float = _us("head_us_per_sampled_token")
    per_token: float = _us("head_us_per_token")
    # Fractional slow-down of a layer per GB/s of host↔device copies in flight while it computes.
    copy_slowdown_per_gb_s: float = quantity("copy_slowdown_per_gb_s", positive=False)
    dense: tuple = curve("layer_us_dense_by_tokens", "us")        # (tokens, seconds) pairs
    lm_head: tuple = curve("head_us_lm_head_by_sampled", "us")     # (sampled tokens, seconds) pairs
    copy_issue: float = quantity("copy_issue_us", "us", positive=False, default=0.0)
    copy_issue_per_call: float = quantity("copy_issue_us_per_call", "us", positive=False, default=0.0)

    def layer_time(self, batch: BatchShape, copy_bandwidth: float = 0.0) -> float:
        alone = interpolate(self.dense, batch.tokens) + float(np.dot(self.coefficients(LAYER_TERMS),
                                                                     features(batch, LAYER_TERMS)))
        return alone * (1.0 + self.copy_slowdown_per_gb_s * copy_bandwidth / 1e9)

    def head_time(self, batch: BatchShape) -> float:
        return interpolate(self.lm_head, batch.sampled_tokens) + float(np.dot(self.coefficients(HEAD_TERMS),
                                                                             features(batch, HEAD_TERMS)))

    def issue_time(self, calls: int) -> float:
        return self.copy_issue + self.copy_issue_per_call * calls

    def coefficients(self, terms: dict) -> list[float]:
        return [getattr(self, name) for name in terms]

    def check_model(self, model: ModelSpec, profile: str) -> "ComputeFit":
        """Itself, if `model` has the architecture it was measured with; else a CatalogError."""
        if architecture(model) != self.architecture:
            raise CatalogError(f"hardware profile '{profile}' was calibrated for {self.model} "
                               f"({self.architecture}), not for {model.name} ({architecture(model)}); "
                               f"simulate the model TOML calibrate wrote beside it, or calibrate this model")
        return self

    def toml_values(self) -> dict:
        """The `[fit]` table in the file's units (µs), keys as the TOML names them."""
        values = {}
        for f in dataclasses.fields(self):
            value, key = getattr(self, f.name), f.metadata["key"]
            if f.metadata.get("curve"):
                if value:
                    values[key] = [[count, seconds * 1e6] for count, seconds in value]
            else:
                values[key] = value * 1e6 if f.metadata.get("unit") is UNITS["us"] else value
        return values


def architecture(model: ModelSpec) -> str:
    """What sets a model's compute time: its shapes and bytes per value (not its name or context)."""
    extras = (", Q/K/V biases" if model.qkv_bias else "") + \
        (f", {model.experts_per_token} of {model.num_experts} experts" if model.moe else "")
    return (f"{model.family}, {model.num_layers} layers, hidden {model.hidden_size}, heads "
            f"{model.num_heads}/{model.num_kv_heads}, ffn {model.ffn_size}{extras}, vocab {model.vocab_size}, "
            f"{model.dtype_bytes}-byte values")


def interpolate(points: tuple, count: int) -> float:
    """The curve's value at `count`: linear between its (count, value) points, beyond either end along the
    nearest segment (never below zero); 0 with no curve."""
    if not points:
        return 0.0
    i = min(max(bisect.bisect_left(points, (count,)), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(0.0, y0 + (y1 - y0) * (count - x0) / (x1 - x0))


def features(batch: BatchShape, terms: dict) -> list[float]:
    return [1.0 if attr is None else float(getattr(batch, attr)) for attr in terms.values()]


def relative_fit(rows, seconds, known=None) -> np.ndarray:
    """Non-negative least squares of `seconds ≈ known + rows · x` (`known`: a part already measured, such
    as a curve's value; default none) that minimises the squared RELATIVE errors (each row divided by its
    measurement), so that millisecond points count as much as second ones and every coefficient stays a
    physical, non-negative cost."""
    from scipy.optimize import nnls  # here: scipy costs every command ~0.3 s to import, and only calibrate fits

    a, t = np.asarray(rows, dtype=float), np.asarray(seconds, dtype=float)
    if len(t) < a.shape[1] or np.any(t <= 0):
        raise ValueError(f"a fit of {a.shape[1]} coefficients needs at least as many positive "
                         f"measurements, got {len(t)}")
    scale = a.max(axis=0)  # columns to a common size; the solver's tolerance is absolute
    scale[scale == 0] = 1.0
    rest = 1.0 if known is None else 1.0 - np.asarray(known, dtype=float) / t
    x, _ = nnls(a / scale / t[:, None], np.broadcast_to(rest, t.shape).copy())
    return x / scale
