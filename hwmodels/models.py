"""Model catalog (one TOML per model in `catalog/models/`) and the sizes and work derived from it.

Two families cover the catalog: OPT (learned positions, biases, LayerNorm, ReLU MLP, tied embeddings)
and Llama (RoPE, no biases, RMSNorm, SwiGLU MLP, grouped-query attention, untied LM head).
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
    ffn_size: int = quantity("ffn_size", whole=True)
    vocab_size: int = quantity("vocab_size", whole=True)
    max_context: int = quantity("max_context", whole=True)
    dtype_bytes: int = quantity("dtype_bytes", whole=True)
    tied_embeddings: bool = flag("tied_embeddings")

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

    # ---- parameters
    @property
    def linear_params_per_layer(self) -> int:
        """Weights of the matrix multiplies of one layer (what a GEMM reads)."""
        h, kv, f = self.hidden_size, self.kv_dim, self.ffn_size
        attention = h * h + 2 * h * kv + h * h  # Q, K, V, O
        mlp = (3 if self.gated_mlp else 2) * h * f
        return attention + mlp

    @property
    def params_per_layer(self) -> int:
        h, kv, f = self.hidden_size, self.kv_dim, self.ffn_size
        if self.family == "opt":  # biases of Q, K, V, O, fc1, fc2 and two LayerNorms (weight + bias)
            small = (h + 2 * kv + h) + (f + h) + 2 * 2 * h
        else:  # two RMSNorm weights
            small = 2 * h
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

    # ---- work of one layer for a batch, split where the roofline differs
    def linear_flops(self, batch: BatchShape) -> float:
        return 2.0 * self.linear_params_per_layer * batch.tokens

    def linear_bytes(self, batch: BatchShape) -> float:
        """Weights read once per iteration, plus each GEMM's input read and output written."""
        h, kv, f = self.hidden_size, self.kv_dim, self.ffn_size
        qkv, o = h + (h + 2 * kv), h + h
        mlp = (h + 2 * f) + (f + h) if self.gated_mlp else (h + f) + (f + h)
        return self.layer_weight_bytes + batch.tokens * (qkv + o + mlp) * self.dtype_bytes

    def attention_flops(self, batch: BatchShape) -> float:
        return 4.0 * self.num_heads * self.head_dim * batch.attended_pairs  # QKᵀ and PV

    def attention_bytes(self, batch: BatchShape) -> float:
        """K and V read for every attended sequence and written for new tokens; Q read, output written."""
        kv = self.kv_bytes_per_token_layer * (batch.kv_tokens_read + batch.tokens)
        return kv + 2.0 * batch.tokens * self.hidden_size * self.dtype_bytes

    def layer_flops(self, batch: BatchShape) -> float:
        return self.linear_flops(batch) + self.attention_flops(batch)

    def layer_hbm_bytes(self, batch: BatchShape) -> float:
        return self.linear_bytes(batch) + self.attention_bytes(batch)

    def head_flops(self, batch: BatchShape) -> float:
        return 2.0 * self.vocab_size * self.hidden_size * batch.sampled_tokens

    def head_bytes(self, batch: BatchShape) -> float:
        """LM head weights, plus hidden states in and logits out for sampled tokens."""
        v, h = self.vocab_size, self.hidden_size
        return (v * h + batch.sampled_tokens * (h + v)) * self.dtype_bytes

    def activation_bytes(self, max_batched_tokens: int, max_seqs: int) -> int:
        """Peak working set of one forward pass: the live tensors of the widest layer step (residual,
        normed input, attention/MLP output, MLP intermediate — three of them for SwiGLU) for every
        batched token, plus FP32 logits for every sequence."""
        mlp_live = (3 if self.gated_mlp else 1) * self.ffn_size
        per_token = (3 * self.hidden_size + mlp_live) * self.dtype_bytes
        return max_batched_tokens * per_token + max_seqs * self.vocab_size * 4


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A built-in model by name (see `model_names()`) or a user's TOML file of the same shape."""
    path = resolve(name_or_path, MODELS_DIR, "model")
    spec = parse(ModelSpec, read_toml(path), path, name=path.stem)
    if spec.hidden_size % spec.num_heads:
        raise CatalogError(f"{path}: field 'hidden_size' ({spec.hidden_size}) must be a multiple of "
                           f"'num_heads' ({spec.num_heads})")
    if spec.num_heads % spec.num_kv_heads:
        raise CatalogError(f"{path}: field 'num_heads' ({spec.num_heads}) must be a multiple of "
                           f"'num_kv_heads' ({spec.num_kv_heads})")
    return spec


def model_names() -> list[str]:
    return names(MODELS_DIR)
