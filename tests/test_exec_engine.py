"""The executor against Hugging Face transformers with the same weights: greedy tokens identical for every
policy, also when most KV lives in CPU memory and sequences are preempted and resumed."""
import pytest
import torch

from hwmodels import CostModel, ModelSpec, load_hardware
from pie_exec.engine import Executor
from pie_exec.model import ArchDetails
from pie_exec.run import Prompt, run
from pie_exec.weights import random_transformer, save_hf_folder
from pie_policy import EngineConfig, ExpansionController, Policy, State

transformers = pytest.importorskip("transformers")

SPECS = {
    "opt": ModelSpec(name="tiny-opt", description="tiny OPT", family="opt", num_layers=2, hidden_size=64,
                     num_heads=4, num_kv_heads=4, ffn_size=128, vocab_size=256, max_context=128, dtype_bytes=4,
                     tied_embeddings=True),
    "llama": ModelSpec(name="tiny-llama", description="tiny Llama, GQA", family="llama", num_layers=2,
                       hidden_size=64, num_heads=4, num_kv_heads=2, ffn_size=128, vocab_size=256,
                       max_context=128, dtype_bytes=4, tied_embeddings=False),
    "qwen2": ModelSpec(name="tiny-qwen2", description="tiny Qwen2: GQA, biases on Q, K and V", family="llama",
                       num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_size=128, vocab_size=256,
                       max_context=128, dtype_bytes=4, tied_embeddings=True, qkv_bias=True),
}
PROMPT_LENGTHS, NEW_TOKENS = (5, 23, 9, 40), (20, 12, 30, 16)


@pytest.fixture(scope="module", params=sorted(SPECS))
def tiny(request, tmp_path_factory):
    """(our model, the same weights in transformers, prompts with HF's greedy continuations)."""
    spec = SPECS[request.param]
    model = random_transformer(spec, seed=1).eval()
    folder = save_hf_folder(model, spec, ArchDetails(), tmp_path_factory.mktemp(spec.name))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(2)
    prompts, expected = [], []
    for i, (length, new) in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS)):
        ids = torch.randint(0, spec.vocab_size, (1, length), generator=gen)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        prompts.append(Prompt(i, 0.0, tuple(ids[0].tolist()), new))
        expected.append(out[0, length:].tolist())
    assert len({t for e in expected for t in e}) > 10, "greedy outputs must vary to prove anything"
    return model, spec, hf, prompts, expected


def serve(model, spec, policy: Policy, prompts):
    executor = Executor(model, policy.config, torch.device("cpu"), policy.staging_slots)
    try:
        return run(executor, policy, prompts, progress=False)
    finally:
        executor.close()


def config(spec, gpu_blocks, cpu_blocks=0, **kw):
    block = 4 * 2 * spec.kv_dim * 4
    return EngineConfig(num_layers=spec.num_layers, block_bytes_layer=block, num_gpu_blocks=gpu_blocks,
                        num_cpu_blocks=cpu_blocks, block_size=4, max_model_len=128, max_num_batched_tokens=128,
                        watermark=0.0, **kw)


def pie(spec, engine: EngineConfig) -> Policy:
    """pie with its controller pricing batches on the CPU's catalog entry (as `pie-exec run` on the CPU),
    starting at a share of 0.5 so that CPU blocks are used from the first admissions."""
    return Policy("pie", engine, controller=ExpansionController(share=0.5, max_share=0.5),
                  cost_model=CostModel(load_hardware("cpu-host"), spec))


CASES = {
    "vllm, roomy": lambda s: Policy("vllm", config(s, 200)),
    "vllm, preempting": lambda s: Policy("vllm", config(s, 15)),
    "vllm-swap, preempting": lambda s: Policy("vllm-swap", config(s, 15, 60)),
    "static, most KV on CPU": lambda s: Policy("static", config(s, 12, 40), cpu_share=0.75),
    "pie, preempting with CPU": lambda s: pie(s, config(s, 14, 14)),
    "pie, chunked prefill, CPU": lambda s: pie(s, config(s, 14, 14, chunked_prefill=True)),
    "pie-fixed, half the KV on CPU": lambda s: Policy("pie-fixed", config(s, 14, 20), cpu_share=0.5),
    "prompt-offload, prompts on CPU": lambda s: Policy("prompt-offload", config(s, 14, 20)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_match_transformers_for_every_policy(tiny, case):
    model, spec, _, prompts, expected = tiny
    policy = CASES[case](spec)
    requests, generated, recorder, _ = serve(model, spec, policy, prompts)
    assert [generated[i] for i in range(len(prompts))] == expected
    assert all(r.state is State.FINISHED for r in requests)
    if "preempting" in case:
        assert any(r.preemptions for r in requests), "the pool was meant to force preemption"
    if "CPU" in case:
        its = recorder.iterations
        assert its["cpu_kv_bytes"].max() > 0 and its["bytes_h2d"].sum() > 0


def test_logits_match_transformers(tiny):
    model, spec, hf, prompts, _ = tiny
    policy = Policy("vllm", config(spec, 100))
    policy.add_request(0, 0.0, len(prompts[3].token_ids), 1)
    plan = policy.next_iteration()
    executor = Executor(model, policy.config, torch.device("cpu"), 1)
    stats, _, logits = executor.execute(plan, [list(prompts[3].token_ids)], 0.0)
    executor.close()
    assert len(stats.layer_compute_s) == len(stats.layer_stall_s) == spec.num_layers
    assert 0 < sum(stats.layer_compute_s) <= stats.compute_s and sum(stats.layer_stall_s) == stats.stall_s
    with torch.no_grad():
        reference = hf(torch.tensor([prompts[3].token_ids])).logits[0, -1]
    assert torch.allclose(logits[0], reference, atol=1e-4), (logits[0] - reference).abs().max()
