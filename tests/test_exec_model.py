"""pie_exec.model and pie_exec.weights against Hugging Face transformers, on tiny random models (CPU, FP32).

The engine's paged attention is replaced here by plain contiguous causal attention over one sequence
(`dense_attend`), and the engine's layer loop by `forward_dense`: what the model computes around `attend`
must then equal HF's forward exactly (up to float rounding), and greedy decoding must pick the same tokens.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from hwmodels import CatalogError, ModelSpec
from pie_exec.model import ArchDetails, Transformer
from pie_exec.weights import ModelFolderError, load_hf_folder, random_transformer, save_hf_folder

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
load_file, save_file = safetensors_torch.load_file, safetensors_torch.save_file

LOGITS_ATOL = 1e-4  # FP32; observed max |diff| against HF's eager attention: 0 to a few 1e-7
PROMPT_LEN, NEW_TOKENS = 12, 20


def tiny_spec(family: str) -> ModelSpec:
    llama = family == "llama"
    return ModelSpec(name=f"tiny-{family}", description="test model", family=family,
                     num_layers=3 if llama else 2, hidden_size=64, num_heads=4, num_kv_heads=2 if llama else 4,
                     ffn_size=160 if llama else 256, vocab_size=300, max_context=128, dtype_bytes=4,
                     tied_embeddings=not llama)


DETAILS = {"opt": ArchDetails(), "llama": ArchDetails(rope_theta=10000.0, rms_norm_eps=1e-5)}
FAMILIES = ("opt", "llama")


# ---------------------------------------------------------------- a dense stand-in for the engine

def dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of one sequence whose whole context is q/k/v ([T, heads, head_dim]); GQA by repeat."""
    T, heads, head_dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) * head_dim**-0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v)


def forward_dense(model: Transformer, token_ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, vocab] of one sequence, recomputed from scratch (no KV cache)."""
    positions = torch.arange(len(token_ids))
    h = model.embed(token_ids, positions)
    for block in model.layers:
        h = block(h, positions, dense_attend)
    return model.logits(h)


@torch.no_grad()
def greedy_dense(model: Transformer, prompt: torch.Tensor, steps: int) -> list[int]:
    tokens = prompt.clone()
    for _ in range(steps):
        nxt = forward_dense(model, tokens)[-1].argmax()
        tokens = torch.cat([tokens, nxt[None]])
    return tokens[len(prompt):].tolist()


def prompt_ids(seed: int, length: int = PROMPT_LEN, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(1000 + seed))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (our model, HF folder, HF model), built once for the module."""
    out = {}
    for family in FAMILIES:
        spec = tiny_spec(family)
        model = random_transformer(spec, seed=0, details=DETAILS[family])
        folder = save_hf_folder(model, spec, DETAILS[family], tmp_path_factory.mktemp(family) / spec.name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        out[family] = (model, folder, hf)
    return out


# ---------------------------------------------------------------- against Hugging Face

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(saved, family):
    model, _, hf = saved[family]
    ids = prompt_ids(0)
    with torch.no_grad():
        ours = forward_dense(model, ids)
        theirs = hf(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    assert ours.shape == theirs.shape == (PROMPT_LEN, 300)
    diff = (ours - theirs).abs().max().item()
    assert diff <= LOGITS_ATOL, f"max |logits diff| {diff:.3g} > {LOGITS_ATOL}"
    assert ours.std() > 0.5  # not a degenerate (near-constant) model


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate(saved, family):
    model, _, hf = saved[family]
    ids = prompt_ids(1)
    ours = greedy_dense(model, ids, NEW_TOKENS)
    with torch.no_grad():
        out = hf.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=NEW_TOKENS)
    # The saved config sets no eos token, so generation runs the full NEW_TOKENS steps.
    assert out[0, len(ids):].tolist() == ours
    assert len(set(ours)) > 3, f"greedy output barely varies: {ours}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_model_greedy_output_varies(family, seed):
    model = random_transformer(tiny_spec(family), seed=seed, details=DETAILS[family])
    tokens = greedy_dense(model, prompt_ids(seed), NEW_TOKENS)
    assert len(set(tokens)) >= 5, f"seed {seed}: greedy output barely varies: {tokens}"


def test_random_model_is_seeded():
    spec = tiny_spec("llama")
    a, b, c = (random_transformer(spec, seed=s) for s in (7, 7, 8))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


# ---------------------------------------------------------------- the engine-facing interface

@pytest.mark.parametrize("family", FAMILIES)
def test_attend_gets_documented_shapes(family):
    spec = tiny_spec(family)
    model = random_transformer(spec, seed=0)
    seen = []

    def attend(q, k, v):
        seen.append((tuple(q.shape), tuple(k.shape), tuple(v.shape), q.stride(-1), k.stride(-1), v.stride(-1)))
        return dense_attend(q, k, v)

    T = 5
    h = model.embed(prompt_ids(0, T), torch.arange(T))
    assert h.shape == (T, spec.hidden_size)
    h = model.layers[0](h, torch.arange(T), attend)
    assert h.shape == (T, spec.hidden_size)
    assert seen == [((T, spec.num_heads, spec.head_dim), (T, spec.num_kv_heads, spec.head_dim),
                     (T, spec.num_kv_heads, spec.head_dim), 1, 1, 1)]
    assert model.logits(h[-2:]).shape == (2, spec.vocab_size)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_flattened_batch_and_incremental_decode_match_dense(family):
    """What the engine does — several sequences flattened into one step, prefill then one token at a
    time with a KV cache — gives the dense forward's logits: positions are per token, nothing else
    couples tokens."""
    spec = tiny_spec(family)
    model = random_transformer(spec, seed=3)
    seqs = [prompt_ids(s, n) for s, n in ((0, 7), (1, 4), (2, 9))]
    cache = [[{"k": [], "v": []} for _ in model.layers] for _ in seqs]  # [seq][layer]

    def step(chunks):
        """chunks: per sequence, (token ids, start position); returns the logits of every new token."""
        ids = torch.cat([c for c, _ in chunks])
        positions = torch.cat([torch.arange(p, p + len(c)) for c, p in chunks])
        bounds = torch.tensor([0] + [len(c) for c, _ in chunks]).cumsum(0).tolist()
        h = model.embed(ids, positions)
        for layer, block in enumerate(model.layers):
            def attend(q, k, v, layer=layer):
                outs = []
                for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                    kv = cache[s][layer]
                    kv["k"].append(k[lo:hi])
                    kv["v"].append(v[lo:hi])
                    K, V = torch.cat(kv["k"]), torch.cat(kv["v"])
                    n_new, n_all = hi - lo, len(K)
                    rep = spec.num_heads // spec.num_kv_heads
                    K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
                    scores = torch.einsum("thd,shd->hts", q[lo:hi], K) * spec.head_dim**-0.5
                    causal = torch.arange(n_all)[None, :] > torch.arange(n_all - n_new, n_all)[:, None]
                    outs.append(torch.einsum("hts,shd->thd", scores.masked_fill(causal, float("-inf")).softmax(-1), V))
                return torch.cat(outs)
            h = block(h, positions, attend)
        return model.logits(h), bounds

    logits, bounds = step([(s, 0) for s in seqs])  # prefill of all three at once
    for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        torch.testing.assert_close(logits[lo:hi], forward_dense(model, seqs[s]), atol=1e-5, rtol=0)
    for _ in range(3):  # decode steps, one token per sequence
        nxt = [torch.tensor([int(logits[hi - 1].argmax())]) for hi in bounds[1:]]
        logits, bounds = step([(t, len(s)) for t, s in zip(nxt, seqs)])
        seqs = [torch.cat([s, t]) for s, t in zip(seqs, nxt)]
        for s in range(len(seqs)):
            torch.testing.assert_close(logits[s], forward_dense(model, seqs[s])[-1], atol=1e-5, rtol=0)


def test_transformer_refuses_inconsistent_spec():
    with pytest.raises(ValueError, match="grouped-query"):
        Transformer(replace(tiny_spec("opt"), num_kv_heads=2))
    with pytest.raises(ValueError, match="divide"):
        Transformer(replace(tiny_spec("llama"), num_kv_heads=3))


def test_bfloat16_model_runs_finite():
    spec = replace(tiny_spec("llama"), hidden_size=256, num_heads=8, ffn_size=688, num_layers=6)
    model = random_transformer(spec, seed=0, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = forward_dense(model, prompt_ids(0))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------- load_hf_folder

@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(saved, family):
    model, folder, _ = saved[family]
    loaded, spec, details = load_hf_folder(folder)
    assert spec == replace(model.spec, description=spec.description)
    assert details == model.details
    ours, theirs = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name


def test_load_casts_dtype(saved):
    model, folder, _ = saved["llama"]
    loaded, spec, _ = load_hf_folder(folder, dtype=torch.bfloat16)
    assert spec.dtype_bytes == 2
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.layers[1].wo.weight, model.layers[1].wo.weight.to(torch.bfloat16))


def test_bfloat16_model_saves_and_loads(tmp_path):
    spec = tiny_spec("opt")
    model = random_transformer(spec, seed=5, dtype=torch.bfloat16)
    folder = save_hf_folder(model, spec, ArchDetails(), tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded, _, _ = load_hf_folder(folder, dtype=torch.bfloat16)
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name


def test_save_refuses_a_spec_of_another_model(tmp_path):
    spec = tiny_spec("llama")
    model = random_transformer(spec, seed=0)
    with pytest.raises(ValueError, match="differ"):
        save_hf_folder(model, replace(spec, num_layers=2), ArchDetails(), tmp_path / "x")
    with pytest.raises(ValueError, match="differ"):
        save_hf_folder(model, spec, ArchDetails(rope_theta=1e6), tmp_path / "x")


def test_load_llama_details_and_configs_resaved_by_transformers(tmp_path):
    """rope_theta / rms_norm_eps travel through config.json, also in the `rope_parameters` form that
    transformers 5 writes; an untied head and a tied one both load."""
    spec = replace(tiny_spec("llama"), num_layers=1, tied_embeddings=True)
    details = ArchDetails(rope_theta=500000.0, rms_norm_eps=1e-6)
    model = random_transformer(spec, seed=4, details=details)
    folder = save_hf_folder(model, spec, details, tmp_path / "m")
    transformers.AutoConfig.from_pretrained(folder).save_pretrained(folder)
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())
    loaded, spec2, details2 = load_hf_folder(folder)
    assert details2 == details and spec2.tied_embeddings
    ids = prompt_ids(0)
    with torch.no_grad():
        torch.testing.assert_close(forward_dense(loaded, ids), forward_dense(model, ids), atol=0, rtol=0)


def test_load_sharded_and_unprefixed(saved, tmp_path):
    """Several shards load as one; OPT checkpoints saved from the bare model (`decoder.…`, as the
    facebook/opt-* ones are) load too, and a redundant tied `lm_head.weight` is accepted."""
    model, folder, _ = saved["opt"]
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    half = len(names) // 2
    save_file({n.removeprefix("model."): tensors[n] for n in names[:half]}, out / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]} | {"lm_head.weight": tensors["model.decoder.embed_tokens.weight"]},
              out / "model-00002-of-00002.safetensors")
    loaded, _, _ = load_hf_folder(out)
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name
    # With an index, exactly the shards it names are read (a stray extra file is ignored) ...
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names[:half]}
             | {n: "model-00002-of-00002.safetensors" for n in names[half:]}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"junk": torch.zeros(1)}, out / "consolidated.safetensors")
    load_hf_folder(out)
    # ... and a shard it names must be there.
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="names shard 'model-00002-of-00002.safetensors'"):
        load_hf_folder(out)


# ---------------------------------------------------------------- bad folders

def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is _DELETE:
                del config[key]
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _edit_tensors(fn):
    def edit(folder):
        tensors = load_file(folder / "model.safetensors")
        fn(tensors)
        save_file(tensors, folder / "model.safetensors")
    return edit


_DELETE = object()

BAD = {
    # name: (family, edit of a valid folder, fragment the message must contain); config.json's problems are
    # the simulator's too (hwmodels reads it: a CatalogError), the rest the executor's (a ModelFolderError).
    "missing-folder": ("opt", lambda f: __import__("shutil").rmtree(f), "does not exist"),
    "not-a-folder": ("opt", lambda f: (__import__("shutil").rmtree(f), f.write_text("x")), "is not a folder"),
    "no-config": ("opt", lambda f: (f / "config.json").unlink(), "no config.json in the folder"),
    "config-not-json": ("opt", lambda f: (f / "config.json").write_text("{hidden_size: 64"), "not valid JSON"),
    "config-not-object": ("opt", lambda f: (f / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "unknown-model-type": ("llama", _edit_config(model_type="gpt2"), "unknown model_type 'gpt2'"),
    "no-model-type": ("llama", _edit_config(model_type=_DELETE), "missing field 'model_type'"),
    "missing-field": ("opt", _edit_config(ffn_dim=_DELETE), "missing field 'ffn_dim'"),
    "wrong-type": ("llama", _edit_config(hidden_size="64"),
                   "field 'hidden_size' must be a positive whole number, not '64'"),
    "negative": ("llama", _edit_config(num_hidden_layers=-1),
                 "'num_hidden_layers' must be a positive whole number, not -1"),
    "rope-scaling": ("llama", _edit_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                     "unsupported feature: rope_scaling of type 'llama3'"),
    "attention-bias": ("llama", _edit_config(attention_bias=True), "unsupported feature: attention_bias"),
    "opt-350m-projection": ("opt", _edit_config(word_embed_proj_dim=32), "unsupported feature: word_embed_proj_dim"),
    "opt-post-ln": ("opt", _edit_config(do_layer_norm_before=False), "unsupported feature: do_layer_norm_before"),
    "quantized": ("llama", _edit_config(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    "bad-gqa": ("llama", _edit_config(num_key_value_heads=3),
                "'num_attention_heads' (4) must be a multiple of 'num_key_value_heads' (3)"),
    "no-safetensors": ("opt", lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"),
                       "no *.safetensors file"),
    "corrupt-safetensors": ("opt", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 8),
                            "model.safetensors is not a readable safetensors file"),
    "missing-tensor": ("llama", _edit_tensors(lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "missing tensor 'model.layers.1.mlp.up_proj.weight' of shape [160, 64]"),
    "missing-untied-head": ("llama", _edit_tensors(lambda t: t.pop("lm_head.weight")),
                            "missing tensor 'lm_head.weight' of shape [300, 64]"),
    "mis-shaped-tensor": ("opt", _edit_tensors(lambda t: t.update({"model.decoder.layers.0.self_attn.k_proj.weight":
                                                                    torch.zeros(64, 32)})),
                          "tensor 'model.decoder.layers.0.self_attn.k_proj.weight' has shape [64, 32], "
                          "expected [64, 64]"),
    "unexpected-tensor": ("llama", _edit_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias":
                                                                      torch.zeros(64)})),
                          "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
}
EXECUTOR_CASES = {"missing-folder", "not-a-folder", "rope-scaling", "no-safetensors", "corrupt-safetensors",
                  "missing-tensor", "missing-untied-head", "mis-shaped-tensor", "unexpected-tensor"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_folder_is_refused_with_folder_and_problem_named(tmp_path, case):
    family, edit, fragment = BAD[case]
    spec = replace(tiny_spec(family), num_layers=2)
    folder = save_hf_folder(random_transformer(spec, seed=0), spec, ArchDetails(), tmp_path / "model")
    edit(folder)
    with pytest.raises(ModelFolderError if case in EXECUTOR_CASES else CatalogError) as info:
        load_hf_folder(folder)
    assert isinstance(info.value, ValueError)
    assert str(folder) in str(info.value)
    assert fragment in str(info.value)


# ---------------------------------------------------------------- Qwen2, Mistral: folders transformers writes

def hf_random_folder(config, folder, seed: int):
    """A model transformers builds from `config`, its weights drawn as `random_transformer` draws ours (HF's own
    init makes a tiny model repeat one token), saved by `save_pretrained`: (folder, HF model)."""
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            value = torch.randn(param.shape, generator=gen)
            if "embed" in name or "lm_head" in name:
                value = value / config.hidden_size**0.5
            elif "norm" in name:
                value = 1.0 + 0.1 * value
            elif name.endswith("bias"):
                value = 0.1 * value
            else:
                value = value * (2.0 / param.shape[1] ** 0.5)
            param.copy_(value)
    hf.save_pretrained(folder)
    return folder, hf.eval()


TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None, pad_token_id=None)
HF_CONFIGS = {
    "qwen2": lambda: transformers.Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=False),
    "qwen2-tied": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    # A window shorter than the context: max_context becomes the window, within which it is full attention.
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=64, rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_folders_transformers_writes_load_and_decode_as_transformers_does(tmp_path, kind):
    folder, hf = hf_random_folder(HF_CONFIGS[kind](), tmp_path / kind, seed=11)
    model, spec, _ = load_hf_folder(folder)
    assert spec.qkv_bias == kind.startswith("qwen2") and spec.num_kv_heads == 2
    assert spec.max_context == (64 if kind == "mistral" else 128)
    assert sum(p.numel() for p in model.parameters()) == spec.total_params == sum(p.numel() for p in hf.parameters())
    ids = prompt_ids(2)
    with torch.no_grad():
        ours = forward_dense(model, ids)
        theirs = hf(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
        diff = (ours - theirs).abs().max().item()
        assert diff <= LOGITS_ATOL, f"max |logits diff| {diff:.3g} > {LOGITS_ATOL}"
        generated = hf.generate(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
    tokens = greedy_dense(model, ids, NEW_TOKENS)
    assert tokens == generated and len(set(tokens)) > 3, tokens


def test_a_mixture_of_experts_is_refused_by_the_executor(tmp_path):
    config = transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelFolderError, match="unsupported feature: a mixture of 4 experts"):
        load_hf_folder(tmp_path)
    with pytest.raises(ValueError, match="mixtures of experts"):
        Transformer(replace(tiny_spec("llama"), num_experts=4, experts_per_token=2))


def test_a_model_with_qkv_biases_saves_as_qwen2(tmp_path):
    spec = replace(tiny_spec("llama"), qkv_bias=True)
    model = random_transformer(spec, seed=6, details=DETAILS["llama"])
    folder = save_hf_folder(model, spec, DETAILS["llama"], tmp_path / "q")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    ids = prompt_ids(3)
    with torch.no_grad():
        theirs = hf.eval()(ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
        assert (forward_dense(model, ids) - theirs).abs().max().item() <= LOGITS_ATOL
    loaded, _, _ = load_hf_folder(folder)
    assert torch.equal(loaded.layers[1].wqkv.bias, model.layers[1].wqkv.bias)
