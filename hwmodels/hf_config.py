"""A Hugging Face `config.json` read into a `ModelSpec`: the one reading of a model's sizes that the simulator
and the executor share (the executor adds its weights; see `pie_exec.weights`).

Supported `model_type`s, all but OPT of the Llama family (RoPE, RMSNorm, SwiGLU with SiLU, grouped-query
attention):

    opt      OPT with pre-LayerNorm and no embedding projection (OPT-125M, 1.3B ... 175B; not OPT-350M)
    llama    Llama 1, 2, 3 and 3.1-3.3 (no biases)
    mistral  Mistral (as Llama)
    qwen2    Qwen2 and Qwen2.5 (biases on Q, K and V)
    mixtral  Mixtral (a mixture of SwiGLU experts: num_local_experts, num_experts_per_tok of them a token)

Decided here, and why:
- RoPE variants (Llama 3.1's "llama3" scaling, "linear", "dynamic", "yarn", a partial rotary factor)
  change neither sizes nor FLOPs: accepted, and described in `HFConfig.rope_variant` for the executor,
  which computes plain RoPE only and refuses the others.
- A sliding window (Mistral v0.1, Qwen2 with `use_sliding_window`) shorter than `max_position_embeddings`
  caps `max_context` at the window: within it, sliding-window attention is full attention, so every
  request the simulator accepts is costed exactly; a longer one is refused, never costed as attention it
  would not do.
- `dtype_bytes` comes from `torch_dtype` (or `dtype`); a config without one is taken at 2 bytes (FP16/BF16,
  how released checkpoints are served).
- Anything else that would change sizes or FLOPs is refused by name (a quantized checkpoint, OPT-350M's
  projections, Llama's `attention_bias`, `mlp_bias`, a `head_dim` other than hidden_size / heads), as is a
  field the sizes need that is missing (transformers' defaults for it differ between model types), a
  `model_type` not above, and an activation other than the family's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .models import ModelSpec, checked
from .spec import CatalogError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_DTYPE_BYTES = 2
LLAMA_TYPES = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED = ("opt",) + LLAMA_TYPES
# transformers' defaults where a config.json may leave a field out (its config classes' own).
ROPE_THETA = {"mixtral": 1e6}                 # else 10000
SLIDING_WINDOW = {"mistral": 4096, "qwen2": 4096}  # else none (qwen2: with use_sliding_window)
# ModelSpec's fields by their names in config.json (for error messages).
NAMES = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
         "ffn_size": "intermediate_size", "max_context": "max_position_embeddings", "num_experts": "num_local_experts",
         "experts_per_token": "num_experts_per_tok"}


@dataclass(frozen=True)
class HFConfig:
    """What a config.json says: the sizes (`spec`) and what the executor needs to compute as transformers
    does (RoPE base, RMSNorm epsilon, and any RoPE variant it would have to refuse)."""
    spec: ModelSpec
    model_type: str
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    rope_variant: str | None = None  # e.g. "rope_scaling of type 'llama3'"; None: plain RoPE (or OPT)


def read_hf_config(path: str | Path) -> HFConfig:
    """A model folder's `config.json`, or a config file itself. The model is named after the folder (after
    the file, unless it is called config.json)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CatalogError(f"{path}: no config.json in the folder" if path.is_dir() else f"{path}: no such file")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CatalogError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CatalogError(f"{file}: not a JSON object")
    name = file.resolve().parent.name if file.stem == "config" else file.stem
    return _Reader(config, file).read(name)


class _Reader:
    """One config's fields, each read with its type checked and its absence or value refused by name."""

    def __init__(self, config: dict, file: Path):
        self.config, self.file = config, file

    def fail(self, problem: str) -> CatalogError:
        return CatalogError(f"{self.file}: {problem}")

    def has(self, key: str) -> bool:
        return self.config.get(key) is not None

    def number(self, key: str, default: Any = None, whole: bool = True) -> Any:
        """A positive number (whole, unless `whole` is false); `default` when absent (None: required)."""
        if not self.has(key):
            if default is None:
                raise self.fail(f"missing field '{key}'")
            return default
        value = self.config[key]
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value <= 0:
            raise self.fail(f"field '{key}' must be a positive {'whole ' if whole else ''}number, not {value!r}")
        return value if whole else float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        value = default if value is None else value
        if not isinstance(value, bool):
            raise self.fail(f"field '{key}' must be true or false, not {value!r}")
        return value

    def require(self, key: str, wanted: Any, default: Any, why: str) -> None:
        actual = self.config.get(key, default)
        actual = default if actual is None else actual
        if actual != wanted:
            raise self.fail(f"unsupported feature: {key} = {json.dumps(actual)} ({why})")

    def read(self, name: str) -> HFConfig:
        config = self.config
        if not self.has("model_type"):
            raise self.fail("missing field 'model_type'")
        model_type = config["model_type"]
        if model_type not in SUPPORTED:
            raise self.fail(f"unknown model_type {model_type!r} (supported: {', '.join(sorted(SUPPORTED))})")
        if config.get("quantization_config"):
            raise self.fail("unsupported feature: quantization_config (a quantized checkpoint)")
        heads = self.number("num_attention_heads")
        sizes = dict(num_layers=self.number("num_hidden_layers"), hidden_size=self.number("hidden_size"),
                     num_heads=heads, vocab_size=self.number("vocab_size"),
                     max_context=self.number("max_position_embeddings"), dtype_bytes=self._dtype_bytes())
        if model_type == "opt":
            sizes |= self._opt(sizes["hidden_size"])
            numerics: tuple = ()
            names = NAMES | {"ffn_size": "ffn_dim", "num_kv_heads": "num_attention_heads"}
        else:
            sizes |= self._llama(model_type, sizes["hidden_size"], heads)
            sizes["max_context"] = self._window(model_type, sizes["max_context"])
            numerics, names = self._rope(model_type), NAMES
        capped = "" if sizes["max_context"] == config["max_position_embeddings"] else \
            f", context capped at its sliding window of {sizes['max_context']}"
        spec = ModelSpec(name=name, description=f"{model_type} model of {self.file}{capped}",
                         family="opt" if model_type == "opt" else "llama", **sizes)
        return HFConfig(checked(spec, self.file, names), model_type, *numerics)

    def _dtype_bytes(self) -> int:
        key = "torch_dtype" if self.has("torch_dtype") else "dtype"
        if not self.has(key):
            return DEFAULT_DTYPE_BYTES
        value = self.config[key]
        if value not in DTYPE_BYTES:
            raise self.fail(f"field '{key}' must be one of {', '.join(DTYPE_BYTES)}, not {value!r}")
        return DTYPE_BYTES[value]

    def _opt(self, hidden: int) -> dict:
        projection = self.number("word_embed_proj_dim", hidden)
        if projection != hidden:
            raise self.fail(f"unsupported feature: word_embed_proj_dim = {projection} differs from hidden_size = "
                            f"{hidden} (embedding projections, as in OPT-350M)")
        self.require("do_layer_norm_before", True, True, "only pre-LayerNorm OPT is modelled")
        self.require("_remove_final_layer_norm", False, False, "the final LayerNorm is always there")
        self.require("activation_function", "relu", "relu", "OPT's MLP is ReLU")
        self.require("enable_bias", True, True, "OPT's layers have biases")
        self.require("layer_norm_elementwise_affine", True, True, "OPT's LayerNorms have weight and bias")
        return dict(ffn_size=self.number("ffn_dim"), num_kv_heads=self.config["num_attention_heads"],
                    tied_embeddings=self.flag("tie_word_embeddings", True))

    def _llama(self, model_type: str, hidden: int, heads: int) -> dict:
        self.require("hidden_act", "silu", "silu", "the Llama family's MLP is SwiGLU with SiLU")
        if model_type == "llama":
            self.require("attention_bias", False, False, "biases on Q, K, V and O are not modelled")
            self.require("mlp_bias", False, False, "biases in the MLP are not modelled")
        if self.has("head_dim") and hidden % heads == 0:
            self.require("head_dim", hidden // heads, hidden // heads,
                         "head_dim must be hidden_size / num_attention_heads")
        # Llama 1 configs have no num_key_value_heads (LlamaConfig reads it as heads); the others must say.
        sizes = dict(ffn_size=self.number("intermediate_size"),
                     num_kv_heads=self.number("num_key_value_heads", heads if model_type == "llama" else None),
                     tied_embeddings=self.flag("tie_word_embeddings", False), qkv_bias=model_type == "qwen2")
        if model_type == "mixtral":
            sizes |= dict(num_experts=self.number("num_local_experts"),
                          experts_per_token=self.number("num_experts_per_tok"))
        return sizes

    def _window(self, model_type: str, context: int) -> int:
        """The context, capped at a sliding window shorter than it (see the module's docstring)."""
        if model_type == "llama" or (model_type == "qwen2" and not self.flag("use_sliding_window", False)):
            return context
        if "sliding_window" not in self.config:  # transformers' default for the type
            return min(context, SLIDING_WINDOW.get(model_type, context))
        return context if self.config["sliding_window"] is None else min(context, self.number("sliding_window"))

    def _rope(self, model_type: str) -> tuple[float, float, str | None]:
        """(RoPE base, RMSNorm epsilon, the RoPE variant if not plain), from the top level or, as
        transformers 5 writes them, `rope_parameters`."""
        theta = self.number("rope_theta", ROPE_THETA.get(model_type, 10000.0), whole=False)
        variant = None
        for key in ("rope_scaling", "rope_parameters"):
            rope = self.config.get(key)
            if rope is None:
                continue
            if not isinstance(rope, dict):
                raise self.fail(f"field '{key}' must be an object, not {rope!r}")
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                variant = f"{key} of type {kind!r}"
            elif rope.get("partial_rotary_factor", 1.0) != 1.0:
                variant = f"{key}.partial_rotary_factor = {rope['partial_rotary_factor']}"
            if "rope_theta" in rope:
                theta = _Reader(rope, self.file).number("rope_theta", whole=False)
        eps = self.number("rms_norm_eps", 1e-5 if model_type == "mixtral" else 1e-6, whole=False)
        return theta, eps, variant
