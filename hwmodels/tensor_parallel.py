"""Tensor parallelism: `tp` GPUs of one server act as one engine.

Each GPU holds 1/tp of every layer's heads (their KV included) and of its FFN, computes its share of every
layer and joins two all-reduces a layer (roofline.py prices both). Seen from the policies, the engine is
one GPU whose HBM is the tp GPUs' together and whose link to CPU memory is theirs together: a KV block is
split by heads, so each GPU copies its share of it over its own link at the same time as the others (a copy
pays the per-call latency once, in parallel on every GPU, and moves its bytes at tp times one link's rate).
Where GPUs share a PCIe switch's uplink, a GPU gets its share of the uplink; the sum never exceeds the host
memory's bandwidth. `tp_view` builds that one-GPU view of the hardware entry; with tp = 1 it is the entry
itself, so a run without tensor parallelism is the same, bit for bit.
"""
from __future__ import annotations

import dataclasses

from .hardware import HardwareSpec
from .models import ModelSpec


class TensorParallelError(ValueError):
    """A tensor-parallel degree the model or the server cannot take."""


def check_tensor_parallel(hw: HardwareSpec, model: ModelSpec, tp: int) -> None:
    """Refuse a degree that does not split the heads evenly, exceeds the server's GPUs, or has no
    all-reduce to price (neither the server's interconnect figures nor a profile's measurements)."""
    where = f"tensor parallelism over {tp} GPUs"
    if tp < 1:
        raise TensorParallelError(f"{where}: the degree must be at least 1")
    if tp == 1:
        return
    if model.num_heads % tp or model.num_kv_heads % tp:
        raise TensorParallelError(f"{where}: {model.name}'s {model.num_heads} attention heads and {model.num_kv_heads} "
                                  f"KV heads must both split evenly over the GPUs")
    if tp > hw.server.num_gpus:
        raise TensorParallelError(f"{where}: {hw.name} has {hw.server.num_gpus} GPU{'s' * (hw.server.num_gpus > 1)}")
    if hw.fit is not None:
        raise TensorParallelError(f"{where}: {hw.name}'s [fit] was calibrated on one device")
    if hw.server.all_reduce_bandwidth is None and (hw.profile is None or hw.profile.network is None):
        raise TensorParallelError(f"{where}: {hw.name} has no all-reduce figures ([server] all_reduce_gb_s) "
                                  f"and no measured all-reduce ([profile] network)")


def tp_view(hw: HardwareSpec, tp: int) -> HardwareSpec:
    """The tp GPUs as one (see the module's docstring); `hw` itself for one GPU."""
    if tp == 1:
        return hw
    server, gpu = hw.server, hw.gpu
    behind_one_switch = min(tp, server.gpus_per_switch)

    def together(bandwidth: float) -> float:
        per_gpu = bandwidth if server.switch_uplink_bandwidth is None else \
            min(bandwidth, server.switch_uplink_bandwidth / behind_one_switch)
        return min(tp * per_gpu, hw.host.bandwidth)

    link = hw.link
    return dataclasses.replace(
        hw, name=f"{hw.name}-tp{tp}",
        description=f"{hw.description}, {tp} GPUs as one engine (tensor parallel)",
        gpu=dataclasses.replace(gpu, hbm_bytes=gpu.hbm_bytes * tp, hbm_bandwidth=gpu.hbm_bandwidth * tp,
                                peak_flops=gpu.peak_flops * tp),
        link=dataclasses.replace(link, h2d_bandwidth=together(link.h2d_bandwidth),
                                 d2h_bandwidth=together(link.d2h_bandwidth),
                                 bidirectional_bandwidth=together(link.bidirectional_bandwidth)),
        server=dataclasses.replace(server, num_gpus=server.num_gpus // tp))
