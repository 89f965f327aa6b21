"""Measured operator times in Vidur's published profiling format: a profile that prices a layer from
measurements instead of the roofline.

A Vidur-format folder holds, per GPU ("device") and model, `compute/<device>/<org>/<model>/mlp.csv` (every
operator of a layer but attention, by `num_tokens` and `num_tensor_parallel_workers`) and optionally
`attention.csv` (attention kernels by `batch_size`, `kv_cache_size` and `prefill_chunk_size`), and per
server `network/<network>/all_reduce.csv` (NCCL all-reduce by message `size` in bytes and `num_workers`);
times in ms, of which Pie reads the medians (`time_stats.<op>.median`). How each becomes a time:

- the dense part of a layer (norms, QKV and output projections, rotary, MLP, activation, residual add) is
  the sum of those operators at the batch's token count, linear between the measured counts; a count
  outside them is refused, naming the file, column and value;
- attention is fitted, because its points are scattered over (batch, length) rather than on a grid: a
  decode kernel costs s(B) per sequence plus x(B) per KV token read, s and x linear in the batch B between
  knots (1, 4, 16, ... up to the largest measured batch: small batches read KV at a lower rate), and a
  prefill kernel a fixed cost plus one per token and one per attended (query, key) pair; both by
  non-negative least squares of relative errors (`profile.relative_fit`). Beyond the measured batch,
  length or chunk the fit carries on along its last segment, with one warning per file and column;
- an all-reduce is the measured time at its message size among the server's own rows
  (`devices_per_node == num_workers`), after a running median over 5 neighbouring sizes (NCCL's
  small-message times are bimodal), linear in between; sizes outside the measured ones are refused;
- `emb` (the embedding lookup) by token count, once per iteration.

A profile is refused for a model it has no mlp.csv rows for (matched by shape: heads, KV heads, hidden,
FFN, gated MLP; 2-byte values) and for a tensor-parallel degree its files have no rows for.
"""
from __future__ import annotations

import bisect
import csv
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .batch import BatchShape
from .models import ModelSpec
from .profile import relative_fit
from .spec import CatalogError, text

# The operators of a layer that mlp.csv times, in a layer's order; `emb` is once per iteration.
DENSE_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
             "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
SHAPE_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "use_gated_mlp")
ATTENTION_SHAPE = ("n_q_head", "n_kv_head", "n_embd")
# Kernels of a decode or prefill attention row; the reshapes are optional columns (0 where absent).
ATTENTION_EXTRAS = ("attn_input_reshape", "attn_output_reshape", "attn_kv_cache_save")
SMOOTHING = 5          # neighbouring message sizes in an all-reduce's running median
KNOT_RATIO = 4         # decode-attention knots: 1, 4, 16, ... and the largest measured batch
Keep = Callable[[np.ndarray], np.ndarray]  # measured x values (or row indices) -> those to use


class ProfileWarning(UserWarning):
    """A shape beyond a profile's measurements, priced by extending its fit."""


def median(op: str) -> str:
    return f"time_stats.{op}.median"


def vidur_shape(model: ModelSpec) -> tuple:
    """What a Vidur profile is matched on (its own column names for them are SHAPE_COLUMNS)."""
    return (model.num_heads, model.num_kv_heads, model.hidden_size, model.ffn_size, model.gated_mlp)


class Table:
    """A CSV file's columns as strings, read once; `number`/`flag` convert one (once), naming the file on
    error."""

    def __init__(self, path: Path, columns: dict):
        self.path, self.columns = path, columns
        self._converted: dict[tuple, np.ndarray] = {}

    @classmethod
    def read(cls, path: Path, required: tuple[str, ...]) -> "Table":
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            raise CatalogError(f"{path}: no such file") from None
        header = rows[0].keys() if rows else ()
        missing = [c for c in required if c not in header]
        if missing or not rows:
            raise CatalogError(f"{path}: missing column '{missing[0]}'" if missing else f"{path}: no rows")
        return cls(path, {c: [r[c] for r in rows] for c in header})

    def has(self, column: str) -> bool:
        return column in self.columns

    def number(self, column: str, blank: float | None = None) -> np.ndarray:
        if (column, blank) not in self._converted:
            self._converted[column, blank] = self._numbers(column, blank)
        return self._converted[column, blank]

    def _numbers(self, column: str, blank: float | None) -> np.ndarray:
        values = []
        for row, cell in enumerate(self.columns[column], start=2):
            try:
                values.append(blank if cell == "" and blank is not None else float(cell))
            except ValueError:
                raise CatalogError(f"{self.path}: column '{column}' line {row}: not a number: {cell!r}") from None
        return np.array(values)

    def flag(self, column: str) -> np.ndarray:
        return np.array([cell.strip().lower() == "true" for cell in self.columns[column]])


@dataclass(frozen=True)
class Curve:
    """Seconds measured at rising x (token counts, message bytes), linear in between; an x outside the
    measured range is refused, naming the file and the column it would be read from."""
    path: str
    column: str
    xs: tuple
    ys: tuple

    def __call__(self, x: float) -> float:
        xs = self.xs
        if not xs[0] <= x <= xs[-1]:
            raise CatalogError(f"{self.path}: column '{self.column}' has no measurement at {x:g} "
                               f"(measured {xs[0]:g} to {xs[-1]:g})")
        i = bisect.bisect_left(xs, x)
        if xs[i] == x:
            return self.ys[i]
        (x0, y0), (x1, y1) = (xs[i - 1], self.ys[i - 1]), (xs[i], self.ys[i])
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def curve(table: Table, column: str, xs: np.ndarray, ys: np.ndarray, keep: Keep | None = None) -> Curve:
    """The curve of `ys` by `xs` (repeated x: their mean), of the x values `keep` selects (default all)."""
    unique, inverse = np.unique(xs, return_inverse=True)
    means = np.bincount(inverse, weights=ys) / np.bincount(inverse)
    chosen = keep(unique) if keep is not None else np.ones(len(unique), bool)
    if chosen.sum() < 2:
        raise CatalogError(f"{table.path}: column '{column}' needs at least two measured values")
    return Curve(str(table.path), column, floats(unique[chosen]), floats(means[chosen]))


def _rows_for(table: Table, columns: tuple[str, ...], values: tuple, tp_column: str, tp: int) -> np.ndarray:
    """The rows of `table` whose shape columns equal `values` at tensor-parallel degree `tp`; refused,
    naming the column and value, when there are none."""
    rows = np.ones(len(table.columns[tp_column]), bool)
    for column, value in zip(columns, values):
        rows &= (table.flag(column) == value) if isinstance(value, bool) else (table.number(column) == value)
    degrees = sorted({int(d) for d in table.number(tp_column)[rows]})
    rows &= table.number(tp_column) == tp
    if not rows.any():
        raise CatalogError(f"{table.path}: column '{tp_column}' has no rows for {tp} "
                           f"(has {', '.join(map(str, degrees)) or 'none for this model'})")
    return rows


def dense_curves(table: Table, shape: tuple, tp: int, keep: Keep | None = None) -> dict[str, Curve]:
    """Each operator of DENSE_OPS (and `emb`) by token count at degree `tp`."""
    rows = _rows_for(table, SHAPE_COLUMNS, shape, "num_tensor_parallel_workers", tp)
    tokens = table.number("num_tokens")[rows]
    return {op: curve(table, "num_tokens", tokens, table.number(median(op))[rows] * 1e-3, keep)
            for op in (*DENSE_OPS, "emb")}


def summed(curves: list[Curve]) -> Curve:
    """One curve, the sum of `curves` (measured at the same x)."""
    return Curve(curves[0].path, curves[0].column, curves[0].xs, tuple(map(sum, zip(*(c.ys for c in curves)))))


@dataclass(frozen=True)
class DecodeAttention:
    """Seconds of one decode attention kernel over `sequences` reading `kv_tokens` in all: s(B) per
    sequence plus x(B) per KV token, each linear in B between `knots` (constant beyond the last)."""
    knots: tuple
    per_sequence: tuple
    per_kv_token: tuple

    def __call__(self, sequences: int, kv_tokens: int) -> float:
        return float(np.dot(knot_weights(self.knots, sequences),
                            np.array(self.per_sequence) * sequences + np.array(self.per_kv_token) * kv_tokens))


def knot_weights(knots: tuple, x: float) -> np.ndarray:
    """The weight of each knot at `x` for linear interpolation between them (the nearest end outside)."""
    weights = np.zeros(len(knots))
    i = bisect.bisect_left(knots, x)
    if i == 0 or i == len(knots):
        weights[min(i, len(knots) - 1)] = 1.0
    else:
        w = (x - knots[i - 1]) / (knots[i] - knots[i - 1])
        weights[i - 1], weights[i] = 1.0 - w, w
    return weights


@dataclass(frozen=True)
class AttentionFit:
    """Attention of a layer from a profile's attention.csv (see the module's docstring)."""
    path: str
    decode: DecodeAttention
    prefill: tuple          # seconds per kernel, per prefill token, per attended pair
    limits: dict            # column -> largest measured value (beyond it: extrapolated, one warning)

    def __call__(self, batch: BatchShape) -> float:
        seconds = 0.0
        if batch.decode_tokens:
            self._check("batch_size", batch.decode_tokens)
            self._check("kv_cache_size", batch.decode_kv_tokens / batch.decode_tokens - 1)
            seconds += self.decode(batch.decode_tokens, batch.decode_kv_tokens)
        if batch.prefill_tokens:
            self._check("prefill_chunk_size", batch.prefill_tokens)
            per_call, per_token, per_pair = self.prefill
            seconds += (per_call + per_token * batch.prefill_tokens
                        + per_pair * (batch.attended_pairs - batch.decode_kv_tokens))
        return seconds

    def _check(self, column: str, value: float) -> None:
        if value > self.limits[column] and (self.path, column) not in _WARNED:
            _WARNED.add((self.path, column))
            warnings.warn(f"{self.path}: column '{column}' measured up to {self.limits[column]:g}, a batch needs "
                          f"{value:g}: attention priced by extending the fit (warned once)", ProfileWarning,
                          stacklevel=4)


_WARNED: set = set()   # (file, column) pairs already warned about in this process


@dataclass(frozen=True)
class AttentionRows:
    """The measured attention kernels of one model at one degree: per row, prefill or decode, the
    batch, the KV already cached, the prefill chunk and the seconds (attention plus its reshapes)."""
    prefill: np.ndarray
    batch: np.ndarray
    kv: np.ndarray
    chunk: np.ndarray
    seconds: np.ndarray

    @classmethod
    def of(cls, table: Table, model: ModelSpec, tp: int, keep: Keep | None = None) -> "AttentionRows":
        """The rows of `model`'s shape at degree `tp` (`keep`: of their indices, those to use; default all)."""
        shape = (model.num_heads, model.num_kv_heads, model.hidden_size)
        index = np.flatnonzero(_rows_for(table, ATTENTION_SHAPE, shape, "num_tensor_parallel_workers", tp))
        if keep is not None:
            index = index[keep(np.arange(len(index)))]
        prefill = table.flag("is_prefill")[index]
        extras = sum(table.number(median(op), blank=0.0)[index] for op in ATTENTION_EXTRAS if table.has(median(op)))
        kernel = np.where(prefill, table.number(median("attn_prefill"), blank=0.0)[index],
                          table.number(median("attn_decode"), blank=0.0)[index])
        return cls(prefill, table.number("batch_size")[index], table.number("kv_cache_size")[index],
                   table.number("prefill_chunk_size")[index], (kernel + extras) * 1e-3)


def attention_fit(table: Table, model: ModelSpec, tp: int, keep: Keep | None = None) -> AttentionFit:
    """Fit decode and prefill attention to the rows of `model`'s shape at degree `tp` (`keep` as in
    AttentionRows.of)."""
    rows = AttentionRows.of(table, model, tp, keep)
    d, p = ~rows.prefill, rows.prefill
    for kind, chosen in (("decode", d), ("prefill", p)):
        if chosen.sum() < 3:
            raise CatalogError(f"{table.path}: column 'is_prefill' has {chosen.sum()} {kind} rows for "
                               f"{model.name} at {tp} GPUs; at least 3 are needed")
    batch, kv, chunk = rows.batch[d], rows.kv[d], rows.chunk[p]
    knots = decode_knots(batch.max())
    weights = np.array([knot_weights(knots, b) for b in batch])
    decode_columns = np.hstack([weights * batch[:, None], weights * (batch * (kv + 1))[:, None]])
    cached = rows.kv[p]
    prefill_columns = np.column_stack([np.ones(p.sum()), chunk, chunk * cached + chunk * (chunk + 1) / 2])
    try:
        x_decode = relative_fit(decode_columns, rows.seconds[d])
        x_prefill = relative_fit(prefill_columns, rows.seconds[p])
    except ValueError as e:
        raise CatalogError(f"{table.path}: {e}") from None
    n = len(knots)
    limits = {"batch_size": batch.max(), "kv_cache_size": kv.max(), "prefill_chunk_size": chunk.max()}
    return AttentionFit(str(table.path), DecodeAttention(knots, floats(x_decode[:n]), floats(x_decode[n:])),
                        floats(x_prefill), {k: float(v) for k, v in limits.items()})


def decode_knots(largest: float) -> tuple:
    knots = [1.0]
    while knots[-1] * KNOT_RATIO < largest:
        knots.append(knots[-1] * KNOT_RATIO)
    return tuple(knots + [float(largest)]) if largest > knots[-1] else tuple(knots)


def floats(values) -> tuple:
    return tuple(float(v) for v in values)


def all_reduce_curve(table: Table, tp: int, keep: Keep | None = None) -> Curve:
    """All-reduce seconds by message bytes among `tp` GPUs of one server (see the module's docstring)."""
    rows = _rows_for(table, ("devices_per_node",), (tp,), "num_workers", tp)
    collective = np.array([c == "all_reduce" for c in table.columns["collective"]])
    sizes, seconds = table.number("size")[rows & collective], table.number(median("all_reduce"))[rows & collective]
    order = np.argsort(sizes, kind="stable")
    smooth = np.array([np.median(seconds[order][max(0, i - SMOOTHING // 2): i + SMOOTHING // 2 + 1])
                       for i in range(len(order))])
    return curve(table, "size", sizes[order], smooth * 1e-3, keep)


@dataclass(frozen=True)
class VidurProfile:
    """One model's measured times on one GPU (`tp` of them working together): what the cost model reads."""
    name: str
    ops: dict               # operator -> Curve by token count (DENSE_OPS and `emb`)
    dense: Curve            # the sum of DENSE_OPS
    attention: AttentionFit | None
    all_reduce: Curve | None

    def embedding_time(self, tokens: int) -> float:
        return self.ops["emb"](tokens)


@dataclass(frozen=True)
class ProfileSpec:
    """A hardware entry's `[profile]`: a Vidur-format folder (relative to the entry's file), the GPU's name
    in it (`compute/<device>/`) and, optionally, the server's (`network/<network>/`)."""
    folder: Path = text("vidur")
    device: str = text("device")
    network: str | None = text("network", default=None)

    def compute_dir(self) -> Path:
        return self.folder / "compute" / self.device


def model_folder(spec: ProfileSpec, model: ModelSpec) -> Path:
    """The `compute/<device>/<org>/<model>` folder whose mlp.csv has `model`'s shape; refused, listing the
    shapes the device has, when none has."""
    shape, found = vidur_shape(model), []
    for mlp in sorted(spec.compute_dir().glob("*/*/mlp.csv")):
        table = Table.read(mlp, ("num_tokens", "num_tensor_parallel_workers", *SHAPE_COLUMNS))
        first = tuple(bool(table.flag(c)[0]) if c == "use_gated_mlp" else int(table.number(c)[0])
                      for c in SHAPE_COLUMNS)
        if first == shape:
            return mlp.parent
        found.append(f"{mlp.parent.relative_to(spec.compute_dir())} {first}")
    raise CatalogError(f"{spec.compute_dir()}: no mlp.csv for {model.name} (heads, KV heads, hidden, FFN, gated = "
                       f"{shape}); it has: {'; '.join(found) or 'none'}")


def read_mlp(path: Path) -> Table:
    return Table.read(path, ("num_tokens", "num_tensor_parallel_workers", *SHAPE_COLUMNS,
                             *(median(op) for op in (*DENSE_OPS, "emb"))))


def read_attention(path: Path) -> Table:
    return Table.read(path, ("num_tensor_parallel_workers", *ATTENTION_SHAPE, "batch_size", "kv_cache_size",
                             "prefill_chunk_size", "is_prefill", median("attn_prefill"), median("attn_decode")))


def read_all_reduce(path: Path) -> Table:
    return Table.read(path, ("num_workers", "devices_per_node", "size", "collective", median("all_reduce")))


@lru_cache(maxsize=32)
def load_profile(spec: ProfileSpec, model: ModelSpec, tp: int = 1) -> VidurProfile:
    """`model`'s profile at `tp` GPUs from `spec`'s folder (read once per process)."""
    if model.dtype_bytes != 2:
        raise CatalogError(f"{spec.folder}: Vidur profiles are measured with 2-byte values; {model.name} has "
                           f"{model.dtype_bytes}-byte values")
    folder = model_folder(spec, model)
    ops = dense_curves(read_mlp(folder / "mlp.csv"), vidur_shape(model), tp)
    attention = None
    if (folder / "attention.csv").is_file():
        attention = attention_fit(read_attention(folder / "attention.csv"), model, tp)
    all_reduce = None
    if spec.network is not None and tp > 1:
        all_reduce = all_reduce_curve(read_all_reduce(spec.folder / "network" / spec.network / "all_reduce.csv"), tp)
    return VidurProfile(f"{spec.device} {folder.name} at {tp} GPU{'s' * (tp > 1)}", ops,
                        summed([ops[op] for op in DENSE_OPS]), attention, all_reduce)
