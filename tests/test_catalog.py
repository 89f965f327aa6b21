"""Catalog entries load; derived sizes match hand counts and Hugging Face; bad TOML is refused by file and field."""
import re

import pytest

from hwmodels import BatchShape, CatalogError, hardware_names, load_hardware, load_model, model_names

from .conftest import DATA

REQUIRED_HARDWARE = {"gh200-96g", "gh200-144g", "h100-sxm-pcie5", "h200-sxm-pcie5", "a100-80g-sxm-pcie4", "cpu-host"}
REQUIRED_MODELS = {"opt-125m", "opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b", "llama-2-7b",
                   "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b"}


def test_catalog_has_every_required_entry_and_they_load():
    assert REQUIRED_HARDWARE <= set(hardware_names())
    assert REQUIRED_MODELS <= set(model_names())
    assert any(load_hardware(n).server.num_gpus == 8 for n in hardware_names())
    for name in hardware_names():
        hw = load_hardware(name)
        assert hw.name == name and hw.gpu.hbm_bytes > 0 and hw.link.h2d_bandwidth > 0
    for name in model_names():
        assert load_model(name).name == name


def test_units_are_converted_to_si():
    hw = load_hardware("gh200-96g")
    assert hw.gpu.hbm_bytes == 96 * 1024**3
    assert hw.gpu.hbm_bandwidth == 4000e9
    assert hw.gpu.peak_flops == 989e12
    assert hw.link.h2d_bandwidth == 345e9
    assert hw.link.transfer_latency == 8e-6


def test_kv_bytes_per_token_by_hand():
    # K and V, 40 layers, hidden 5120, FP16.
    assert load_model("opt-13b").kv_bytes_per_token == 2 * 40 * 5120 * 2
    # Llama-3-8B: grouped-query attention, 8 KV heads of 128 dims, 32 layers.
    assert load_model("llama-3-8b").kv_bytes_per_token_layer == 2 * 8 * 128 * 2
    assert load_model("llama-3-8b").kv_bytes_per_token == 2 * 8 * 128 * 2 * 32


def test_tiny_model_counts_by_hand():
    m = load_model(DATA / "tiny-opt.toml")
    linear = 4 * 64 * 64 + 2 * 64 * 256                      # Q K V O, fc1 fc2
    small = (64 * 3 + 64) + (256 + 64) + 2 * 2 * 64          # their biases, two LayerNorms
    assert m.params_per_layer == linear + small == 49984
    assert m.embedding_params == 1000 * 64 + 130 * 64 + 2 * 64  # tokens, positions (+2), final LN
    assert m.weight_bytes == 2 * (2 * 49984 + 72448)


def test_layer_flops_and_bytes_for_a_decode_by_hand():
    m = load_model(DATA / "tiny-opt.toml")
    batch = BatchShape.of(decodes=[10])      # one sequence, 10 tokens cached, attends to 11
    assert m.layer_flops(batch) == 2 * 49152 + 4 * 64 * 11
    kv = 2 * 64 * 2 * (11 + 1)               # K,V read for 11 positions, written for the new token
    activations = (64 + 192 + 64 + 64 + 64 + 256 + 256 + 64) * 2
    assert m.layer_hbm_bytes(batch) == 49984 * 2 + activations + kv + 2 * 64 * 2


def test_prefill_attention_is_causal():
    # 4 new tokens after 3 cached: they attend to 4, 5, 6, 7 positions.
    batch = BatchShape.of(prefills=[(4, 3)])
    assert batch.attended_pairs == 4 + 5 + 6 + 7
    assert batch.kv_tokens_read == 7 and batch.tokens == 4 and batch.sampled_tokens == 1


@pytest.mark.parametrize("name", sorted(REQUIRED_MODELS))
def test_parameter_counts_match_transformers(name):
    """The same architecture built by Hugging Face transformers (on the meta device: no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = load_model(name)
    if m.family == "opt":
        config = transformers.OPTConfig(
            hidden_size=m.hidden_size, num_hidden_layers=m.num_layers, ffn_dim=m.ffn_size,
            num_attention_heads=m.num_heads, vocab_size=m.vocab_size,
            max_position_embeddings=m.max_context, word_embed_proj_dim=m.hidden_size)
        with torch.device("meta"):
            hf = transformers.OPTForCausalLM(config)
        layer = hf.model.decoder.layers[0]
    else:
        config = transformers.LlamaConfig(
            hidden_size=m.hidden_size, intermediate_size=m.ffn_size, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, vocab_size=m.vocab_size,
            max_position_embeddings=m.max_context, tie_word_embeddings=m.tied_embeddings)
        with torch.device("meta"):
            hf = transformers.LlamaForCausalLM(config)
        layer = hf.model.layers[0]
    assert m.params_per_layer == sum(p.numel() for p in layer.parameters())
    assert m.total_params == sum(p.numel() for p in hf.parameters())


TINY_HW = (DATA / "tiny-hw.toml").read_text()


@pytest.mark.parametrize("edit, field, problem", [
    (lambda t: t.replace("hbm_bandwidth_gb_s = 100\n", ""), "gpu.hbm_bandwidth_gb_s", "missing"),
    (lambda t: t.replace("h2d_gb_s = 10", "h2d_gb_s = -10"), "link.h2d_gb_s", "must not be negative"),
    (lambda t: t.replace("peak_dense_tflops = 1", "peak_dense_tflops = 0"), "gpu.peak_dense_tflops", "must be positive"),
    (lambda t: t.replace("hbm_efficiency = 0.5", "hbm_efficiency = 1.5"), "gpu.hbm_efficiency", "at most 1"),
    (lambda t: t.replace("copy_engines = 2", "copy_engines = 1.5"), "link.copy_engines", "whole number"),
    (lambda t: t.replace("memory_gib = 4", 'memory_gib = "4"'), "host.memory_gib", "must be a number"),
    (lambda t: t.replace("h2d_gb_s = 10", "h2d_gbs = 10"), "link.h2d_gbs", "unknown field"),
    (lambda t: t.replace("[server]\nnum_gpus = 1\ngpus_per_switch = 1\n", ""), "server", "missing"),
    # TOML writes infinity as inf: a time of inf, a bandwidth of inf (copies in no time) are not figures
    (lambda t: t.replace("layer_overhead_us = 10", "layer_overhead_us = inf"), "gpu.layer_overhead_us",
     "must be at most 1e+15, a finite number (got inf)"),
    (lambda t: t.replace("hbm_bandwidth_gb_s = 100", "hbm_bandwidth_gb_s = inf"), "gpu.hbm_bandwidth_gb_s",
     "must be at most 1e+15"),
    (lambda t: t.replace("hbm_bandwidth_gb_s = 100", "hbm_bandwidth_gb_s = 1e30"), "gpu.hbm_bandwidth_gb_s",
     "must be at most 1e+15"),
    (lambda t: t.replace("h2d_gb_s = 10", "h2d_gb_s = 1_000_000_000_000_001"), "link.h2d_gb_s", "must be at most"),
    # a block table entry per KV block of the HBM: a petabyte ran out of memory building it
    (lambda t: t.replace("hbm_gib = 1", "hbm_gib = 1e15"), "gpu.hbm_gib", "must be at most 16384"),
    (lambda t: t + (DATA / "tiny-fit.toml").read_text().replace("[8, 200]", "[8, inf]"),
     "fit.layer_us_dense_by_tokens", "at most 1e+15, finite, not [8, inf]"),
    (lambda t: t.replace("bidirectional_gb_s = 12", "bidirectional_gb_s = 9.5"), "link.bidirectional_gb_s",
     "= 9.5 must be at least the faster direction's 10 (h2d_gb_s, d2h_gb_s) with 2 copy engines"),
    (lambda t: t.replace("d2h_gb_s = 5", "d2h_gb_s = 20"), "link.bidirectional_gb_s", "faster direction's 20"),
])
def test_bad_hardware_toml_is_refused_naming_file_and_field(write, edit, field, problem):
    path = write("my-gpu.toml", edit(TINY_HW))
    with pytest.raises(CatalogError) as info:
        load_hardware(path)
    message = str(info.value)
    assert str(path) in message and f"'{field}'" in message and problem in message, message


def test_bounds_are_inclusive(write):
    """1e12 GB/s and TFLOP/s stand for "free" in test systems; two engines capped at one direction's
    bandwidth together (directions that share a bus) make a link."""
    text = TINY_HW.replace("hbm_bandwidth_gb_s = 100", "hbm_bandwidth_gb_s = 1e15")
    hw = load_hardware(write("edge.toml", text.replace("bidirectional_gb_s = 12", "bidirectional_gb_s = 10")))
    assert hw.gpu.hbm_bandwidth == 1e24 and hw.link.bidirectional_bandwidth == hw.link.h2d_bandwidth == 10e9
    assert load_hardware(DATA / "fixed-cost-hw.toml").gpu.peak_flops == 1e24
    # one copy engine: the directions take turns, both together between the two (a calibrated CPU host)
    turns = TINY_HW.replace("copy_engines = 2", "copy_engines = 1").replace("bidirectional_gb_s = 12",
                                                                            "bidirectional_gb_s = 6.5")
    assert load_hardware(write("turns.toml", turns)).link.bidirectional_bandwidth == 6.5e9


def test_bad_model_toml_is_refused_naming_file_and_field(write):
    text = (DATA / "tiny-opt.toml").read_text()
    path = write("m.toml", text.replace("num_layers = 2", "num_layers = -2"))
    with pytest.raises(CatalogError, match=re.escape(f"{path}: field 'num_layers' must not be negative")):
        load_model(path)
    path = write("m.toml", text.replace('family = "opt"', 'family = "gpt"'))
    with pytest.raises(CatalogError, match="'family' must be one of opt, llama"):
        load_model(path)
    path = write("m.toml", text.replace("num_heads = 4", "num_heads = 3").replace("num_kv_heads = 4", "num_kv_heads = 3"))
    with pytest.raises(CatalogError, match="'hidden_size' \\(64\\) must be a multiple of 'num_heads' \\(3\\)"):
        load_model(path)
    path = write("m.toml", "description = [unclosed")
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_model(path)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(CatalogError, match="unknown hardware 'gh300'.*gh200-96g"):
        load_hardware("gh300")
    with pytest.raises(CatalogError, match="unknown model 'opt-7b'.*opt-6.7b"):
        load_model("opt-7b")


def test_the_disk_is_optional_and_read_in_si_units(write):
    assert load_hardware("a100-80g-sxm-pcie4").disk is None
    disk = load_hardware("gh200-96g").disk
    assert (disk.capacity_bytes, disk.read_bandwidth, disk.write_bandwidth, disk.transfer_latency) == (
        7152 * 1024**3, 13e9, 6.6e9, 20e-6)
    no_read = (DATA / "tiny-disk-hw.toml").read_text().replace("read_gb_s = 0.5\n", "")
    with pytest.raises(CatalogError, match=r"no-read\.toml: missing field 'disk\.read_gb_s'"):
        load_hardware(write("no-read.toml", no_read))
