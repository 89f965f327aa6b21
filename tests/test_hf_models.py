"""Hugging Face configs read into ModelSpecs (hwmodels.hf_config): sizes against hand counts and against the
models transformers builds from the same config.json; a mixture of experts' FLOPs, weights and weight reads
by hand and its routing formula against brute force; the simulator runs them; bad configs refused by name."""
import json
import re

import numpy as np
import pytest

from hwmodels import BatchShape, CatalogError, CostModel, load_hardware, load_model
from hwmodels.hardware import HARDWARE_DIR
from hwmodels.hf_config import read_hf_config
from pie_sim.cli import main as pie_sim

# The config.json files as their Hugging Face repositories publish them (fields that do not matter dropped).
QWEN2_7B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 3584,
            "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
            "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152064}
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu",
                "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000}
MISTRAL_7B_V01 = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu",
                  "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                  "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16", "vocab_size": 32000}
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
               "intermediate_size": 14336, "max_position_embeddings": 131072, "num_attention_heads": 32,
               "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
               "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256, "attention_bias": False,
               "mlp_bias": False, "head_dim": 128}


@pytest.fixture
def config_folder(tmp_path):
    """Write a config.json into tmp_path/name/ and return the folder."""
    def _write(name: str, config: dict) -> object:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    return _write


# ---------------------------------------------------------------- sizes

def test_qwen2_7b_by_hand(config_folder):
    m = load_model(config_folder("qwen2-7b", QWEN2_7B))
    assert (m.name, m.family, m.qkv_bias, m.num_kv_heads, m.head_dim, m.max_context) == \
        ("qwen2-7b", "llama", True, 4, 128, 131072)  # use_sliding_window false: no window
    h, kv, f = 3584, 4 * 128, 18944
    layer = (2 * h * h + 2 * h * kv) + 3 * h * f + (h + 2 * kv) + 2 * h  # Q K V O, MLP, Q K V biases, 2 norms
    assert m.params_per_layer == layer
    assert m.total_params == 28 * layer + 2 * 152064 * h + h == 7_615_616_512  # Qwen's "7.6B"
    assert m.weight_bytes == 2 * m.total_params and m.kv_bytes_per_token == 28 * 2 * kv * 2


def test_mixtral_sizes_and_flops_by_hand(config_folder):
    m = load_model(config_folder("mixtral", MIXTRAL_8X7B))
    attention = 4096 * 4096 * 2 + 2 * 4096 * 1024          # Q, O; K, V (8 KV heads of 128)
    expert = 3 * 4096 * 14336                                # gate, up, down
    router, norms = 4096 * 8, 2 * 4096
    assert (attention, expert) == (41_943_040, 176_160_768)
    assert m.params_per_layer == attention + 8 * expert + router + norms == 1_451_270_144
    assert m.total_params == 32 * 1_451_270_144 + 2 * 32000 * 4096 + 4096 == 46_702_792_704  # "46.7B"
    active = 32 * (attention + 2 * expert + router + norms) + 2 * 32000 * 4096 + 4096
    assert active == 12_879_925_248                          # "12.9B parameters per token"
    assert m.weight_bytes == 2 * 46_702_792_704              # every expert resident
    # FLOPs of one token through one layer's GEMMs: its two experts, not eight; and the LM head.
    token = BatchShape.of(decodes=[99])
    assert m.linear_flops(token) == 2 * (attention + 2 * expert + router) == 788_594_688
    assert m.head_flops(token) == 2 * 32000 * 4096
    assert m.layer_flops(token) == 788_594_688 + 4 * 32 * 128 * 100


def test_catalog_mixtral_is_its_config(config_folder):
    spec = load_model(config_folder("m", MIXTRAL_8X7B))
    catalog = load_model("mixtral-8x7b")
    assert catalog == spec.__class__(**{**spec.__dict__, "name": "mixtral-8x7b", "description": catalog.description})


@pytest.mark.parametrize("config", ["QWEN2_7B", "MIXTRAL_8X7B", "MISTRAL_7B_V01", "LLAMA_31_8B"])
def test_parameter_counts_match_transformers(config_folder, config):
    """The model transformers builds from the same config.json (on the meta device: no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = config_folder("m", globals()[config])
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    m = load_model(folder)
    assert m.params_per_layer == sum(p.numel() for p in hf.model.layers[0].parameters())
    assert m.total_params == sum(p.numel() for p in hf.parameters())


def test_sliding_window_caps_the_context_and_rope_scaling_changes_no_size(config_folder):
    assert load_model(config_folder("v01", MISTRAL_7B_V01)).max_context == 4096
    assert load_model(config_folder("v03", MISTRAL_7B_V01 | {"sliding_window": None})).max_context == 32768
    windowed = QWEN2_7B | {"use_sliding_window": True, "sliding_window": 32768}
    assert load_model(config_folder("qwen", windowed)).max_context == 32768
    llama31 = read_hf_config(config_folder("l31", LLAMA_31_8B))
    assert llama31.rope_variant == "rope_scaling of type 'llama3'" and llama31.rope_theta == 500000.0
    llama3 = load_model("llama-3-8b")
    assert llama31.spec.total_params == llama3.total_params and llama31.spec.max_context == 131072


def test_a_config_file_is_named_after_its_file_or_folder(tmp_path):
    (tmp_path / "qwen2-7b").mkdir()
    (tmp_path / "qwen2-7b" / "config.json").write_text(json.dumps(QWEN2_7B))
    (tmp_path / "mine.json").write_text(json.dumps(QWEN2_7B | {"torch_dtype": "float32"}))
    assert load_model(tmp_path / "qwen2-7b" / "config.json").name == "qwen2-7b"
    assert load_model(tmp_path / "qwen2-7b").name == "qwen2-7b"
    mine = load_model(tmp_path / "mine.json")
    assert mine.name == "mine" and mine.dtype_bytes == 4


# ---------------------------------------------------------------- a mixture of experts in the cost model

def test_experts_touched_by_brute_force():
    """E·(1 − (1 − k/E)^T) against routing drawn at random: each of T tokens picks k distinct experts."""
    m = load_model("mixtral-8x7b")
    rng = np.random.default_rng(0)
    for tokens in (1, 2, 3, 5, 8, 16, 40):
        chosen = rng.random((20000, tokens, 8)).argsort(axis=2)[:, :, :2]  # 2 distinct experts a token
        touched = np.zeros((20000, 8), dtype=bool)
        np.put_along_axis(touched, chosen.reshape(20000, -1), True, axis=1)
        assert m.experts_touched(tokens) == pytest.approx(touched.sum(axis=1).mean(), rel=0.005), tokens
    assert m.experts_touched(0) == 0 and m.experts_touched(1) == 2 and m.experts_touched(2) == 3.5
    assert m.experts_touched(200) == pytest.approx(8, rel=1e-12)


def test_moe_layer_time_reads_the_touched_experts_by_hand(tmp_path):
    """On the plain roofline (one GEMM efficiency, no ridge, no element-wise or host terms): the L20's
    datasheet figures with the efficiencies and overhead written here."""
    entry = (HARDWARE_DIR / "pcie-8x-l20.toml").read_text()
    plain = [line for line in entry.splitlines()
             if not line.startswith(("flops_efficiency", "hbm_efficiency", "gemm_ridge", "elementwise", "decode_attention",
                                     "prefill_attention", "layer_overhead", "iteration_overhead"))]
    at = plain.index("[gpu]") + 1
    plain[at:at] = ["flops_efficiency = 0.6", "hbm_efficiency = 0.8", "layer_overhead_us = 10"]
    (tmp_path / "plain-l20.toml").write_text("\n".join(plain) + "\n")
    hw, m = load_hardware(tmp_path / "plain-l20.toml"), load_model("mixtral-8x7b")
    cm = CostModel(hw, m)
    flops, hbm = 119.5e12 * 0.6, 864e9 * 0.8
    expert_bytes = 3 * 4096 * 14336 * 2
    others = (m.params_per_layer - 8 * 3 * 4096 * 14336) * 2  # attention, router, norms
    per_token = (4096 + 4096 + 2048) + (4096 + 4096) + 2 * ((4096 + 2 * 14336) + (14336 + 4096)) + (4096 + 8)
    for sequences in (1, 4, 64):
        batch = BatchShape.of(decodes=[500] * sequences)
        touched = 8 * (1 - 0.75 ** sequences)
        linear = max(2 * (41_943_040 + 2 * 176_160_768 + 32_768) * sequences / flops,
                     (others + touched * expert_bytes + per_token * 2 * sequences) / hbm)
        kv = 2 * 1024 * 2 * (501 * sequences + sequences)
        attention = max(4 * 32 * 128 * 501 * sequences / flops, (kv + 2 * sequences * 4096 * 2) / hbm)
        assert cm.layer_time(batch) == pytest.approx(linear + attention + 10e-6, rel=1e-12)
        assert cm.decode_time(sequences, 501 * sequences, 501 * sequences) == pytest.approx(
            32 * cm.layer_time(batch) + cm.head_time(batch), rel=1e-12)
    # One token reads a quarter of the experts, a large batch all of them.
    assert m.expert_bytes_read(1) == 2 * expert_bytes and m.expert_bytes_read(1000) == pytest.approx(8 * expert_bytes)


# ---------------------------------------------------------------- the simulator runs them

def test_pie_sim_runs_a_qwen2_7b_config(config_folder, tmp_path):
    folder = config_folder("qwen2-7b", QWEN2_7B)
    out = tmp_path / "out"
    assert pie_sim(["run", "--model", str(folder / "config.json"), "--hw", "h100-sxm-pcie5", "--num-requests", "30",
                    "--rate", "10", "--policy", "pie", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "qwen2-7b" and summary["finished"] == 30


@pytest.mark.parametrize("policy", ["pp-vllm", "pipemax"])
def test_pie_sim_runs_mixtral_on_an_8_gpu_server(config_folder, tmp_path, policy):
    config = config_folder("mixtral-8x7b", MIXTRAL_8X7B) / "config.json"
    out = tmp_path / policy
    assert pie_sim(["run", "--model", str(config), "--hw", "pcie-8x-rtx5090", "--policy", policy,
                    "--num-requests", "40", "--rate", "inf", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 40 and summary["model"] == "mixtral-8x7b"


# ---------------------------------------------------------------- bad configs

def _without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


@pytest.mark.parametrize("config, message", [
    (_without(QWEN2_7B, "intermediate_size"), "missing field 'intermediate_size'"),
    (_without(MIXTRAL_8X7B, "num_local_experts"), "missing field 'num_local_experts'"),
    (_without(MISTRAL_7B_V01, "num_key_value_heads"), "missing field 'num_key_value_heads'"),
    (QWEN2_7B | {"model_type": "qwen2_moe"},
     "unknown model_type 'qwen2_moe' (supported: llama, mistral, mixtral, opt, qwen2)"),
    (QWEN2_7B | {"num_hidden_layers": 2.5}, "field 'num_hidden_layers' must be a positive whole number, not 2.5"),
    (MIXTRAL_8X7B | {"num_experts_per_tok": 9},
     "field 'num_experts_per_tok' (9) must be at most 'num_local_experts' (8)"),
    (QWEN2_7B | {"head_dim": 64}, "unsupported feature: head_dim = 64"),
    (QWEN2_7B | {"hidden_act": "gelu"}, "unsupported feature: hidden_act = \"gelu\""),
    (QWEN2_7B | {"torch_dtype": "int4"}, "field 'torch_dtype' must be one of float32, float16, bfloat16, not 'int4'"),
])
def test_bad_config_is_refused_by_file_and_field_and_writes_nothing(config_folder, tmp_path, capsys, config, message):
    path = config_folder("bad", config) / "config.json"
    out = tmp_path / "out"
    assert pie_sim(["run", "--model", str(path), "--num-requests", "5", "--out", str(out)]) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert f"{path}: {message}" in printed, printed
    assert not out.exists()
    with pytest.raises(CatalogError, match=re.escape(message)):
        load_model(path)


def test_missing_config_and_non_json_are_refused(tmp_path):
    with pytest.raises(CatalogError, match="no config.json in the folder"):
        load_model(tmp_path)
    (tmp_path / "c.json").write_text("{nope")
    with pytest.raises(CatalogError, match=re.escape(f"{tmp_path / 'c.json'}: not valid JSON")):
        load_model(tmp_path / "c.json")
    with pytest.raises(CatalogError, match="or give the path of a .toml file, a config.json or a model folder"):
        load_model("qwen-7b")
