"""Weights for `pie_exec.model.Transformer`: seeded random ones, and Hugging Face folders in and out.

A Hugging Face folder is `config.json` plus one or several `*.safetensors` files with HF's parameter names
(what `AutoModelForCausalLM.from_pretrained` reads and `save_pretrained` writes). Its config.json is read by
`hwmodels.hf_config`, as the simulator reads it (a problem there is a `CatalogError`); of what that reads,
the executor runs the dense models with plain ("default") RoPE: OPT, Llama (not Llama-3.1's "llama3"
scaling), Mistral, Qwen2. Mixtures of experts (Mixtral) and other RoPE variants are refused with a
`ModelFolderError` naming the source, as is any problem with the weights.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from hwmodels import ModelSpec, load_model
from hwmodels.hf_config import HFConfig, read_hf_config
from hwmodels.models import is_hf_config

from .model import ArchDetails, Transformer

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the tensors cast into the weights


class ModelFolderError(ValueError):
    """A model folder is missing, malformed, or describes a model the executor does not implement."""


# ---------------------------------------------------------------- what the executor runs

def executable_details(source: HFConfig | ModelSpec, where: str | Path) -> ArchDetails:
    """The numerics the executor needs for a model read from `where` (a config.json's, or the defaults for
    a catalog or TOML model); a `ModelFolderError` for what the executor does not implement."""
    spec = source.spec if isinstance(source, HFConfig) else source
    if spec.moe:
        raise ModelFolderError(f"{where}: unsupported feature: a mixture of {spec.num_experts} experts (the "
                               f"executor runs dense models; simulate it with pie-sim)")
    if not isinstance(source, HFConfig) or spec.family == "opt":  # OPT needs no details
        return ArchDetails()
    if source.rope_variant:
        raise ModelFolderError(f"{where}: unsupported feature: {source.rope_variant} (only plain RoPE is "
                               f"implemented)")
    return ArchDetails(rope_theta=source.rope_theta, rms_norm_eps=source.rms_norm_eps)


def model_shape(name_or_path: str | Path) -> tuple[ModelSpec, ArchDetails]:
    """A model as `pie-sim --model` names it (catalog name, TOML, config.json or model folder) and the
    numerics to build it with; refuses what the executor does not run."""
    source = read_hf_config(name_or_path) if is_hf_config(name_or_path) else load_model(name_or_path)
    return (source.spec if isinstance(source, HFConfig) else source), executable_details(source, name_or_path)


# ---------------------------------------------------------------- random weights

def random_transformer(spec: ModelSpec, seed: int, gain: float = 2.0, details: ArchDetails = ArchDetails(),
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Transformer:
    """A model with seeded random weights, wide enough that greedy decoding produces varied text.

    HF's init (N(0, 0.02²) everywhere, norms at 1, biases 0) leaves a small random model repeating one
    token. Here every projection W: [out, in] is N(0, gain²/in), so each matmul's output has about `gain`
    std for unit-scale input at any width (FP16/BF16 stay far from overflow at any size), and attention
    scores have std about gain² (peaked but not one-hot). Token and position embeddings and an untied LM
    head are N(0, 1/hidden): the layers, not the input token's own embedding, dominate the residual
    stream, so a tied head does not just predict the input token again, and logits have std about 1.
    Norm weights are 1 + N(0, 0.1²), norm and linear biases N(0, 0.1²) — random, so that a checkpoint
    mapping that swaps two of them shows. With the default gain 2, greedy decoding of 20 tokens gives
    7-20 distinct tokens for small OPT and Llama configs (tests/test_exec_model.py checks it).

    Values are drawn on the CPU in FP32 from one `torch.Generator` in parameter order, so a seed gives
    the same model on every device and dtype (a 13B model takes tens of seconds to draw).
    """
    model = Transformer(spec, details, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("embeddings.weight") or name == "output.weight":
                value = value / math.sqrt(spec.hidden_size)
            elif "norm" in name:
                value = 1.0 + 0.1 * value if name.endswith("weight") else 0.1 * value
            elif name.endswith("bias"):
                value = 0.1 * value
            else:  # a projection, [out, in]
                value = value * (gain / math.sqrt(param.shape[1]))
            param.copy_(value)
    return model


# ---------------------------------------------------------------- HF names <-> this model's parameters

def _layout(spec: ModelSpec) -> list[tuple[str, str, slice | None]]:
    """(HF tensor name, this model's parameter, rows of the parameter it fills (None: all))."""
    q, kv, f = spec.num_heads * spec.head_dim, spec.kv_dim, spec.ffn_size
    qkv = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    entries: list[tuple[str, str, slice | None]] = []
    if spec.family == "opt":
        entries += [("model.decoder.embed_tokens.weight", "tok_embeddings.weight", None),
                    ("model.decoder.embed_positions.weight", "pos_embeddings.weight", None)]
        for i in range(spec.num_layers):
            hf, me = f"model.decoder.layers.{i}", f"layers.{i}"
            for kind in ("weight", "bias"):
                entries += [(f"{hf}.self_attn.{p}_proj.{kind}", f"{me}.wqkv.{kind}", rows) for p, rows in qkv.items()]
                entries += [(f"{hf}.self_attn.out_proj.{kind}", f"{me}.wo.{kind}", None),
                            (f"{hf}.self_attn_layer_norm.{kind}", f"{me}.attention_norm.{kind}", None),
                            (f"{hf}.final_layer_norm.{kind}", f"{me}.ffn_norm.{kind}", None),
                            (f"{hf}.fc1.{kind}", f"{me}.mlp.w1.{kind}", None),
                            (f"{hf}.fc2.{kind}", f"{me}.mlp.w2.{kind}", None)]
        entries += [(f"model.decoder.final_layer_norm.{kind}", f"norm.{kind}", None) for kind in ("weight", "bias")]
    else:
        entries.append(("model.embed_tokens.weight", "tok_embeddings.weight", None))
        for i in range(spec.num_layers):
            hf, me = f"model.layers.{i}", f"layers.{i}"
            entries += [(f"{hf}.self_attn.{p}_proj.weight", f"{me}.wqkv.weight", rows) for p, rows in qkv.items()]
            if spec.qkv_bias:
                entries += [(f"{hf}.self_attn.{p}_proj.bias", f"{me}.wqkv.bias", rows) for p, rows in qkv.items()]
            entries += [(f"{hf}.self_attn.o_proj.weight", f"{me}.wo.weight", None),
                        (f"{hf}.input_layernorm.weight", f"{me}.attention_norm.weight", None),
                        (f"{hf}.post_attention_layernorm.weight", f"{me}.ffn_norm.weight", None),
                        (f"{hf}.mlp.gate_proj.weight", f"{me}.mlp.w13.weight", slice(0, f)),
                        (f"{hf}.mlp.up_proj.weight", f"{me}.mlp.w13.weight", slice(f, 2 * f)),
                        (f"{hf}.mlp.down_proj.weight", f"{me}.mlp.w2.weight", None)]
        entries.append(("model.norm.weight", "norm.weight", None))
    if not spec.tied_embeddings:
        entries.append(("lm_head.weight", "output.weight", None))
    return entries


def _architecture(spec: ModelSpec) -> tuple:
    return (spec.family, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.ffn_size,
            spec.vocab_size, spec.max_context, spec.tied_embeddings, spec.qkv_bias)


def _expected_shape(param: Tensor, rows: slice | None) -> tuple[int, ...]:
    shape = tuple(param.shape)
    return shape if rows is None else (rows.stop - rows.start,) + shape[1:]


# ---------------------------------------------------------------- save

def save_hf_folder(model: Transformer, spec: ModelSpec, details: ArchDetails, path: str | Path) -> Path:
    """Write `model` as a Hugging Face folder (`config.json`, `model.safetensors`) that
    `AutoModelForCausalLM.from_pretrained(path)` loads. The config sets no bos/eos/pad token: a random
    model has no tokenizer, and generation must not stop at a token that merely happens to be 2."""
    from safetensors.torch import save_file  # imported here: random weights need no safetensors

    if _architecture(spec) != _architecture(model.spec) or (spec.family == "llama" and details != model.details):
        raise ValueError(f"save_hf_folder: spec {spec.name!r} / details {details} differ from the ones the "
                         f"model was built with ({model.spec.name!r} / {model.details})")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                  num_attention_heads=spec.num_heads, max_position_embeddings=spec.max_context,
                  tie_word_embeddings=spec.tied_embeddings, torch_dtype=DTYPE_NAMES[model.dtype],
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True)
    if spec.family == "opt":
        config = dict(architectures=["OPTForCausalLM"], model_type="opt", **common, ffn_dim=spec.ffn_size,
                      word_embed_proj_dim=spec.hidden_size, do_layer_norm_before=True,
                      activation_function="relu", enable_bias=True, layer_norm_elementwise_affine=True,
                      dropout=0.0, attention_dropout=0.0)
    else:  # Llama, or Qwen2 for biases on Q, K and V (Llama's attention_bias would put one on O too)
        kind = "qwen2" if spec.qkv_bias else "llama"
        config = dict(architectures=["Qwen2ForCausalLM" if spec.qkv_bias else "LlamaForCausalLM"], model_type=kind,
                      **common, intermediate_size=spec.ffn_size, num_key_value_heads=spec.num_kv_heads,
                      head_dim=spec.head_dim, hidden_act="silu", rms_norm_eps=details.rms_norm_eps,
                      rope_theta=details.rope_theta, rope_scaling=None, attention_dropout=0.0,
                      **({} if spec.qkv_bias else dict(attention_bias=False, mlp_bias=False)))
    params = dict(model.named_parameters())
    tensors = {}
    for hf_name, name, rows in _layout(spec):
        value = params[name].detach()
        tensors[hf_name] = (value if rows is None else value[rows]).contiguous().cpu()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- load

def _failing(folder: Path):
    def fail(problem: str) -> ModelFolderError:
        return ModelFolderError(f"model folder {folder}: {problem}")
    return fail


def _read_folder_config(folder: Path, dtype: torch.dtype) -> tuple[ModelSpec, ArchDetails]:
    fail = _failing(folder)
    if not folder.exists():
        raise fail("does not exist")
    if not folder.is_dir():
        raise fail("is not a folder")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"load_hf_folder: dtype {dtype} is not one of {', '.join(DTYPE_NAMES.values())}")
    config = read_hf_config(folder)
    spec = replace(config.spec, dtype_bytes=torch.empty((), dtype=dtype).element_size())
    return spec, executable_details(config, folder)


def read_hf_spec(path: str | Path, dtype: torch.dtype = torch.float32) -> ModelSpec:
    """The ModelSpec of a Hugging Face folder at `dtype`, from its config.json alone (nothing allocated)."""
    return _read_folder_config(Path(path), dtype)[0]


def load_hf_folder(path: str | Path, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[Transformer, ModelSpec, ArchDetails]:
    """Read a Hugging Face folder into a `Transformer` (weights cast to `dtype`, on `device`).

    Returns (model, spec, details); spec.name is the folder's name. Shards are read one tensor at a time
    straight into the model's parameters, so peak memory is about one model plus one tensor.
    """
    from safetensors import safe_open  # imported here: random weights need no safetensors

    folder = Path(path)
    fail = _failing(folder)
    spec, details = _read_folder_config(folder, dtype)
    files = _weight_files(folder, fail)

    model = Transformer(spec, details, dtype=dtype, device=device)
    params = dict(model.named_parameters())
    wanted = {hf_name: (name, rows) for hf_name, name, rows in _layout(spec)}
    seen: dict[str, Path] = {}
    with torch.no_grad():
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as error:  # safetensors raises its own types for a corrupt header
                raise fail(f"{file.name} is not a readable safetensors file ({error})") from error
            with handle:
                for key in handle.keys():
                    hf_name = _canonical(key)
                    if hf_name not in wanted:
                        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight"
                                                                        and spec.tied_embeddings):
                            continue  # recomputed / tied to the token embedding
                        raise fail(f"{file.name}: unexpected tensor {key!r} (a feature this model does not "
                                   f"implement?)")
                    if hf_name in seen:
                        raise fail(f"tensor {key!r} is in both {seen[hf_name].name} and {file.name}")
                    seen[hf_name] = file
                    name, rows = wanted[hf_name]
                    target = params[name] if rows is None else params[name][rows]
                    stored = handle.get_slice(key)
                    if stored.get_dtype() not in FLOAT_DTYPES:
                        raise fail(f"{file.name}: tensor {key!r} holds {stored.get_dtype()}, not floating-point "
                                   f"weights (quantized or corrupt?)")
                    shape = tuple(stored.get_shape())
                    if shape != tuple(target.shape):
                        raise fail(f"{file.name}: tensor {key!r} has shape {list(shape)}, expected "
                                   f"{list(target.shape)}")
                    target.copy_(handle.get_tensor(key))
    missing = [hf_name for hf_name in wanted if hf_name not in seen]
    if missing:
        name, rows = wanted[missing[0]]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise fail(f"missing tensor {missing[0]!r} of shape {list(_expected_shape(params[name], rows))}{more}")
    return model, spec, details


def _weight_files(folder: Path, fail) -> list[Path]:
    """The shards an index (`model.safetensors.index.json`) names, else every `*.safetensors` file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise fail(f"{index.name} is not a valid index (no 'weight_map' object: {error!r})") from error
        for name in names:
            if not (folder / name).is_file():
                raise fail(f"{index.name} names shard {name!r}, which is not in the folder")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise fail("no *.safetensors file (PyTorch .bin checkpoints are not read; convert them first)")
    return files


def _canonical(key: str) -> str:
    """HF names as `*ForCausalLM` saves them: checkpoints of the bare model (e.g. facebook/opt-*, saved
    from OPTModel as `decoder.…`) lack the `model.` prefix."""
    if key.startswith("model.") or key.startswith("lm_head."):
        return key
    return "model." + key
