"""The measured points of the shipped Vidur profiles (hwmodels/profiles/vidur) that the fidelity benchmark
and the roofline's fit compare predictions against, with the parts a prediction is compared on.

A point is one layer of one GPU (of `tp` splitting it) for one batch. Its measured parts:
- gemm: the QKV, output, MLP up/gate and down projections (mlp.csv);
- elementwise: the two norms, rotary, the activation and the residual add (mlp.csv);
- attention: the attention kernel and its reshapes (attention.csv: A100 Llama-2-7B at one GPU only);
- all_reduce: with tp > 1, the layer's two all-reduces of its hidden states, each the server's measured
  time at that message size (all_reduce.csv, interpolated between measured sizes).
The whole layer is their sum. Where a profile has no attention (every profile but A100 Llama-2-7B) a point
is a layer without its attention, at each measured token count; the attention points add the layer's dense
part at their token count (interpolated where the count was not measured) to the measured attention.
A point's regime: small decode (a decode batch of at most 16, or up to 16 tokens), large decode (17-256),
prefill (a prefill chunk, or more than 256 tokens).

`index` numbers a point among its profile's measured token counts (or attention rows, or message sizes):
`fold(k)` keeps those of parity k, so a profile built on one fold predicts the other's points unseen.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from hwmodels import BatchShape, load_hardware, load_model
from hwmodels.hardware import VIDUR_BASES
from hwmodels.vidur import (
    DENSE_OPS,
    AttentionRows,
    VidurProfile,
    all_reduce_curve,
    attention_fit,
    dense_curves,
    read_all_reduce,
    read_attention,
    read_mlp,
    summed,
    vidur_shape,
)

FOLDER = Path(__file__).resolve().parent.parent / "hwmodels" / "profiles" / "vidur"
MODELS = {"llama-2-7b": "Llama-2-7b-hf", "llama-2-70b": "Llama-2-70b-hf"}
DEVICES = ("a100", "h100")
NETWORK = {"a100": "a100_dgx", "h100": "h100_dgx"}
DEGREES = (1, 2, 4, 8)
REGIMES = ("small decode", "large decode", "prefill")
GROUPS = {"gemm": ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"),
          "elementwise": ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add")}
assert sorted(sum(GROUPS.values(), ())) == sorted(DENSE_OPS)


@dataclass(frozen=True)
class Point:
    device: str
    model: str
    tp: int
    shape: BatchShape
    parts: dict          # measured seconds by part (see the module's docstring)
    index: int           # among the profile's token counts, or its attention rows

    @property
    def whole(self) -> float:
        return sum(self.parts.values())

    @property
    def tokens(self) -> int:
        return self.shape.tokens

    @property
    def regime(self) -> str:
        if self.shape.prefill_tokens or self.tokens > 256:
            return "prefill"
        return "small decode" if self.tokens <= 16 else "large decode"

    @property
    def has_attention(self) -> bool:
        return "attention" in self.parts


def profile_folder(device: str, model: str) -> Path:
    return FOLDER / "compute" / device / "meta-llama" / MODELS[model]


def system(device: str) -> str:
    """The catalog's entry for the server a device was profiled in."""
    return VIDUR_BASES[device]


def fold(k: int | None):
    """`keep` for the profile builders: every x of index parity k (None: all)."""
    return None if k is None else (lambda xs: np.arange(len(xs)) % 2 == k)


def group_curves(device: str, model: str, tp: int, keep=None) -> dict:
    """gemm and elementwise curves by token count (each the sum of its operators)."""
    ops = dense_curves(read_mlp(profile_folder(device, model) / "mlp.csv"), vidur_shape(load_model(model)), tp, keep)
    return {group: summed([ops[op] for op in names]) for group, names in GROUPS.items()} | {"ops": ops}


def all_reduce_of(device: str, tp: int, keep=None):
    return all_reduce_curve(read_all_reduce(FOLDER / "network" / NETWORK[device] / "all_reduce.csv"), tp, keep)


def attention_rows(device: str, model: str) -> AttentionRows | None:
    path = profile_folder(device, model) / "attention.csv"
    return AttentionRows.of(read_attention(path), load_model(model), 1) if path.is_file() else None


def profile(device: str, model: str, tp: int, k: int | None = None) -> VidurProfile:
    """The profile the cost model would load, built from fold k of every measurement (None: all of them)."""
    m, folder = load_model(model), profile_folder(device, model)
    ops = dense_curves(read_mlp(folder / "mlp.csv"), vidur_shape(m), tp, fold(k))
    attention = attention_fit(read_attention(folder / "attention.csv"), m, tp, fold(k)) \
        if (folder / "attention.csv").is_file() and tp == 1 else None
    return VidurProfile(f"{device} {model} tp{tp}", ops, summed([ops[op] for op in DENSE_OPS]), attention,
                        all_reduce_of(device, tp, fold(k)) if tp > 1 else None)


def dense_parts(curves: dict, reduce, model, tokens: int) -> dict:
    """The measured gemm and elementwise parts at `tokens`, and both all-reduces where `reduce` is given."""
    parts = {group: curves[group](tokens) for group in GROUPS}
    if reduce is not None:
        parts["all_reduce"] = 2 * reduce(tokens * model.hidden_size * model.dtype_bytes)
    return parts


@cache
def points() -> tuple[Point, ...]:
    """Every measured layer of every shipped profile (see the module's docstring)."""
    out = []
    for device in DEVICES:
        for model in MODELS:
            m = load_model(model)
            for tp in DEGREES:
                curves = group_curves(device, model, tp)
                reduce = all_reduce_of(device, tp) if tp > 1 else None
                for i, tokens in enumerate(curves["gemm"].xs):
                    shape = BatchShape(decode_tokens=int(tokens)) if tokens <= 256 else BatchShape(prefill_tokens=int(tokens))
                    out.append(Point(device, model, tp, shape, dense_parts(curves, reduce, m, int(tokens)), i))
            rows = attention_rows(device, model)
            if rows is None:
                continue
            curves = group_curves(device, model, 1)
            for i in range(len(rows.seconds)):
                b, kv, chunk = int(rows.batch[i]), int(rows.kv[i]), int(rows.chunk[i])
                shape = BatchShape.of(prefills=[(chunk, kv)] * b) if rows.prefill[i] else BatchShape.of(decodes=[kv] * b)
                parts = dense_parts(curves, None, m, shape.tokens) | {"attention": float(rows.seconds[i])}
                out.append(Point(device, model, 1, shape, parts, i))
    return tuple(out)


def server(device: str):
    """The per-GPU hardware entry of the server a device was profiled in."""
    return load_hardware(system(device))
