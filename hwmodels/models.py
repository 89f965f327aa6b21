"""Model catalog (one TOML per model in `catalog/models/`) and the sizes and work derived from it.

Two families cover every model: OPT (learned positions, biases, LayerNorm, ReLU MLP, tied embeddings)
and Llama (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases), which Mistral, Qwen2 (biases
on Q, K and V: `qkv_bias`) and Mixtral (a mixture of SwiGLU experts: `num_experts`, `experts_per_token`)
share. A Hugging Face `config.json` is read into the same `ModelSpec` by `hwmodels.hf_config`.

A mixture of experts keeps every expert's weights resident, spends the FLOPs of `experts_per_token`
experts a token, and reads, per layer and iteration, the weights of the experts its tokens touch: under
uniform, independent routing, E·(1 − (1 − k/E)^T) of the E experts for T tokens choosing k each
(`experts_touched`), every expert at large batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .batch import BatchShape
from .spec import CatalogError, flag, names, parse, quantity, read_toml, resolve, text

MODELS_DIR = Path(__file__).parent / "catalog" / "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str = text("description")
    family: str = text("family", choices=("opt", "llama"))
    num_layers: int = quantity("num_layers", whole=True)
    hidden_size: int = quantity("hidden_size", whole=True)
    num_heads: int = quantity("num_heads", whole=True)
    num_kv_heads: int = quantity("num_kv_heads", whole=True)
    ffn_size: int = quantity("ffn_size", whole=True)  # of one expert, in a mixture of experts
    vocab_size: int = quantity("vocab_size", whole=True)
    max_context: int = quantity("max_context", whole=True)
    dtype_bytes: int = quantity("dtype_bytes", whole=True)
    tied_embeddings: bool = flag("tied_embeddings")
    qkv_bias: bool = flag("qkv_bias", default=False)  # Llama family: Q, K and V projections have biases
    num_experts: int = quantity("num_experts", whole=True, default=1)  # 1: a dense MLP
    experts_per_token: int = quantity("experts_per_token", whole=True, default=1)

    # ---- shapes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token: num_kv_heads · head_dim (smaller than hidden under GQA)."""
        return self.num_kv_heads * self.head_dim

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    @property
    def moe(self) -> bool:
        """A mixture of experts (a router picks `experts_per_token` of `num_experts` MLPs a token)."""
        return self.num_experts > 1

    # ---- parameters
    @property
    def expert_params(self) -> int:
        """Weights of one expert's MLP (of the MLP, in a dense model)."""
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.ffn_size

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts if self.moe else 0

    def _linear_params(self, experts: int) -> int:
        """Weights of one layer's matrix multiplies with `experts` experts' MLPs."""
        h, kv = self.hidden_size, self.kv_dim
        attention = h * h + 2 * h * kv + h * h  # Q, K, V, O
        return attention + experts * self.expert_params + self.router_params

    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the matrix multiplies of one layer, every expert's included (what HBM holds)."""
        return self._linear_params(self.num_experts)

    @property
    def active_linear_params_per_layer(self) -> int:
        """Weights one token multiplies in a layer: the router and `experts_per_token` experts of a mixture."""
        return self._linear_params(self.experts_per_token)

    @property
    def params_per_layer(self) -> int:
        h, kv, f = self.hidden_size, self.kv_dim, self.ffn_size
        if self.family == "opt":  # biases of Q, K, V, O, fc1, fc2 and two LayerNorms (weight + bias)
            small = (h + 2 * kv + h) + (f + h) + 2 * 2 * h
        else:  # two RMSNorm weights (and Qwen2's Q, K, V biases)
            small = 2 * h + ((h + 2 * kv) if self.qkv_bias else 0)
        return self.linear_params_per_layer + small

    @property
    def embedding_params(self) -> int:
        """Everything outside the layers: token (and OPT position) embeddings, final norm, LM head."""
        h = self.hidden_size
        params = self.vocab_size * h
        if self.family == "opt":
            params += (self.max_context + 2) * h + 2 * h  # learned positions (offset 2), final LayerNorm
        else:
            params += h  # final RMSNorm
        if not self.tied_embeddings:
            params += self.vocab_size * h
        return params

    @property
    def total_params(self) -> int:
        return self.num_layers * self.params_per_layer + self.embedding_params

    @property
    def layer_weight_bytes(self) -> int:
        return self.params_per_layer * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.dtype_bytes

    # ---- KV cache
    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_dim * self.dtype_bytes  # K and V

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * self.kv_bytes_per_token_layer

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.dtype_bytes

    # ---- work of one layer for a batch, split where the roofline differs
    def linear_flops(self, batch: BatchShape) -> float:
        return 2.0 * self.active_linear_params_per_layer * batch.tokens

    def linear_bytes(self, batch: BatchShape) -> float:
        """Weights read once per iteration (a mixture's experts aside: `expert_bytes_read`), plus each GEMM's
        input read and output written (each of a token's experts reads its input and writes its output)."""
        h, kv, f = self.hidden_size, self.kv_dim, self.ffn_size
        qkv, o = h + (h + 2 * kv), h + h
        mlp = (h + 2 * f) + (f + h) if self.gated_mlp else (h + f) + (f + h)
        router = h + self.num_experts if self.moe else 0
        weights = self.layer_weight_bytes - (self.num_experts * self.expert_bytes if self.moe else 0)
        return weights + batch.tokens * (qkv + o + self.experts_per_token * mlp + router) * self.dtype_bytes

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct experts `tokens` tokens route to, each choosing `experts_per_token` of
        `num_experts` uniformly and independently of the others: E·(1 − (1 − k/E)^T)."""
        e, k = self.num_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** tokens)

    def expert_bytes_read(self, tokens: int) -> float:
        """Bytes of expert weights one layer reads for `tokens` tokens: the experts they touch (0 for a dense
        model, whose MLP is in `linear_bytes`); not linear in the tokens, so the cost model adds it apart."""
        return self.experts_touched(tokens) * self.expert_bytes if self.moe else 0

    def attention_flops(self, batch: BatchShape) -> float:
        return 4.0 * self.num_heads * self.head_dim * batch.attended_pairs  # QKᵀ and PV

    def attention_bytes(self, batch: BatchShape) -> float:
        """K and V read for every attended sequence and written for new tokens; Q read, output written."""
        kv = self.kv_bytes_per_token_layer * (batch.kv_tokens_read + batch.tokens)
        return kv + 2.0 * batch.tokens * self.hidden_size * self.dtype_bytes

    def layer_flops(self, batch: BatchShape) -> float:
        return self.linear_flops(batch) + self.attention_flops(batch)

    def layer_hbm_bytes(self, batch: BatchShape) -> float:
        return self.linear_bytes(batch) + self.expert_bytes_read(batch.tokens) + self.attention_bytes(batch)

    def head_flops(self, batch: BatchShape) -> float:
        return 2.0 * self.vocab_size * self.hidden_size * batch.sampled_tokens

    def head_bytes(self, batch: BatchShape) -> float:
        """LM head weights, plus hidden states in and logits out for sampled tokens."""
        v, h = self.vocab_size, self.hidden_size
        return (v * h + batch.sampled_tokens * (h + v)) * self.dtype_bytes

    def activation_bytes(self, max_batched_tokens: int, max_seqs: int) -> int:
        """Peak working set of one forward pass: the live tensors of the widest layer step (residual,
        normed input, attention/MLP output, MLP intermediate — three of them for SwiGLU; in a mixture,
        each chosen expert's, and its output, as vLLM's fused MoE kernel keeps them) for every batched
        token, plus FP32 logits for every sequence."""
        k = self.experts_per_token
        mlp_live = (3 if self.gated_mlp else 1) * self.ffn_size * k + (k * self.hidden_size if self.moe else 0)
        per_token = (3 * self.hidden_size + mlp_live) * self.dtype_bytes
        return max_batched_tokens * per_token + max_seqs * self.vocab_size * 4


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A built-in model by name (see `model_names()`), a user's TOML file of the same shape, or a Hugging
    Face `config.json` (any `.json` file) or model folder (its `config.json`)."""
    path = Path(name_or_path)
    if is_hf_config(path):
        from .hf_config import read_hf_config  # it builds ModelSpecs: imported here, not at the top

        return read_hf_config(path).spec
    path = resolve(name_or_path, MODELS_DIR, "model", "the path of a .toml file, a config.json or a model folder")
    return checked(parse(ModelSpec, read_toml(path), path, name=path.stem), path)


def is_hf_config(name_or_path: str | Path) -> bool:
    """Whether `load_model` reads `name_or_path` as a Hugging Face config: a .json file or a folder."""
    path = Path(name_or_path)
    return path.is_dir() or path.suffix == ".json"


def checked(spec: ModelSpec, path: Path, names: dict[str, str] | None = None) -> ModelSpec:
    """`spec`, if its fields fit together; else a CatalogError naming `path` and the fields (by their keys in
    the file: `names` maps a TOML key to the file's own, e.g. a config.json's)."""
    def key(field: str) -> str:
        return (names or {}).get(field, field)

    def refuse(a: str, b: str, problem: str) -> CatalogError:
        return CatalogError(f"{path}: field '{key(a)}' ({getattr(spec, a)}) {problem} '{key(b)}' ({getattr(spec, b)})")

    if spec.hidden_size % spec.num_heads:
        raise refuse("hidden_size", "num_heads", "must be a multiple of")
    if spec.num_heads % spec.num_kv_heads:
        raise refuse("num_heads", "num_kv_heads", "must be a multiple of")
    if spec.experts_per_token > spec.num_experts:
        raise refuse("experts_per_token", "num_experts", "must be at most")
    if spec.family == "opt" and (spec.qkv_bias or spec.moe):
        raise CatalogError(f"{path}: field '{key('qkv_bias' if spec.qkv_bias else 'num_experts')}': OPT has every "
                           f"bias and a dense MLP (the Llama family may have Q, K, V biases or experts)")
    return spec


def model_names() -> list[str]:
    return names(MODELS_DIR)
