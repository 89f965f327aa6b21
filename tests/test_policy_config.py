"""Bad configuration is refused clearly; pools are sized from the memory budget as documented."""
import pytest

from hwmodels import CostModel, load_hardware, load_model
from pie_policy import ConfigError, EngineConfig, Policy
from pie_policy.sizing import SINGLE_GPU_POLICIES, build_policy, engine_config

BASE = dict(num_layers=2, block_bytes_layer=64, num_gpu_blocks=10)


@pytest.mark.parametrize("changes, message", [
    (dict(num_gpu_blocks=0), "num_gpu_blocks must be at least 1, got 0"),
    (dict(block_size=0), "block_size must be at least 1, got 0"),
    (dict(num_cpu_blocks=-1), "num_cpu_blocks must not be negative"),
    (dict(block_size=24), "block_size 24 does not divide max_num_batched_tokens 2048"),
    (dict(block_size=32, max_model_len=1000, max_num_batched_tokens=2048), "does not divide max_model_len 1000"),
    (dict(max_num_batched_tokens=1024), "max_num_batched_tokens \\(1024\\) must be at least max_model_len \\(2048\\)"),
    (dict(watermark=1.0), "watermark must be in \\[0, 1\\)"),
])
def test_bad_engine_config_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**{**BASE, **changes})


def test_bad_policy_settings_are_refused():
    config = EngineConfig(**BASE, num_cpu_blocks=4)
    with pytest.raises(ConfigError, match="cpu_share must be in \\[0, 1\\), got 1.5"):
        Policy("static", config, cpu_share=1.5)
    with pytest.raises(ConfigError, match="unknown policy 'vllm2' \\(known: vllm, vllm-swap, static, pie, pie-fixed, prompt-offload\\)"):
        Policy("vllm2", config)
    with pytest.raises(ConfigError, match="vllm-swap needs CPU swap space"):
        Policy("vllm-swap", EngineConfig(**BASE))
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    with pytest.raises(ConfigError, match="share must be in \\[0, 1\\), got -0.1"):
        build_policy("pie", cm, share=-0.1)
    with pytest.raises(ConfigError, match="unknown policy 'pi'.*flexgen"):
        build_policy("pi", cm)
    with pytest.raises(ConfigError, match="exceeds gh200-96g's host memory 480.0 GiB"):
        build_policy("pie", cm, cpu_mem_bytes=500 * 1024**3)


def test_pools_are_sized_from_the_budget():
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    pool = cm.memory_budget(0.9).kv_pool_bytes
    layer_block = 16 * 2 * 5120 * 2            # 16 tokens of K and V, hidden 5120, FP16
    block = 40 * layer_block
    vllm = build_policy("vllm", cm).config
    assert vllm.num_gpu_blocks == pool // block and vllm.num_cpu_blocks == 0
    swap = build_policy("vllm-swap", cm, cpu_mem_bytes=64 * 1024**3).config
    assert swap.num_cpu_blocks == 64 * 1024**3 // block
    pie = build_policy("pie", cm, share=0.5, cpu_mem_bytes=400 * 1024**3).config
    # share 0.5: as many live CPU blocks as GPU blocks; 2 staging slots of them, one layer each.
    assert pie.num_cpu_blocks == pie.num_gpu_blocks
    assert pie.num_gpu_blocks * block + 2 * pie.num_cpu_blocks * layer_block <= pool
    assert (pie.num_gpu_blocks + 1) * block + 2 * pie.num_cpu_blocks * layer_block > pool
    small = engine_config(cm.model, "static", pool, share=0.5, cpu_mem_bytes=10 * block)  # the CPU memory binds
    assert small.num_cpu_blocks == 10 and small.num_gpu_blocks == (pool - 2 * 10 * layer_block) // block


@pytest.mark.parametrize("name", SINGLE_GPU_POLICIES)
def test_every_policy_builds_from_the_catalog(name):
    cm = CostModel(load_hardware("gh200-96g"), load_model("opt-13b"))
    policy = build_policy(name, cm, cpu_mem_bytes=100 * 1024**3, mean_prompt=90, mean_output=306)
    assert policy.name == name and not policy.has_work


@pytest.mark.parametrize("hw", ["gh200-96g", "h100-sxm-pcie5"])
def test_the_executor_builds_the_engine_the_simulator_simulates(hw):
    """`pie-exec run` and `pie-validate` build a policy with `engine_policy` on their KV pool and the
    requests' mean context; `pie-sim` with `build_policy` on the memory budget's pool: the same engine (the
    link's bound as pie's largest share, the gap a prefetch spans, the staging area) on the same figures."""
    from pie_policy.sizing import coalesce_gap, engine_policy, link_bound_share

    cm = CostModel(load_hardware(hw), load_model("opt-13b"))
    pool = cm.memory_budget(0.5).kv_pool_bytes
    for name in ("pie", "static", "pie-fixed", "vllm"):
        simulated = build_policy(name, cm, gpu_mem_util=0.5, cpu_mem_bytes=100 * 1024**3, mean_prompt=161,
                                 mean_output=338)
        executed = engine_policy(name, cm, pool, context=499, cpu_mem_bytes=100 * 1024**3)
        assert executed.config == simulated.config
    pie = engine_policy("pie", cm, pool, context=499, cpu_mem_bytes=100 * 1024**3)
    assert pie.controller.max_share == link_bound_share(cm, pool, 499) < 0.5
    assert pie.config.coalesce_gap == coalesce_gap(cm, 16) > 0
