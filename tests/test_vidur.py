"""Vidur-format profiles: read as published, interpolated and fitted as documented, refused by file, column
and value where they cannot answer; checked against the shipped CSV files read independently."""
import csv
import re
import warnings

import numpy as np
import pytest

from hwmodels import BatchShape, CatalogError, CostModel, load_hardware, load_model
from hwmodels.hardware import VIDUR_BASES
from hwmodels.vidur import DENSE_OPS, ProfileWarning, Table, attention_fit, knot_weights, median, read_attention
from pie_sim.cli import main

from .conftest import DATA, REPO

SHIPPED = REPO / "hwmodels" / "profiles" / "vidur"
SHAPE = {"n_head": 32, "n_kv_head": 32, "n_embd": 4096, "n_expanded_embd": 11008, "use_gated_mlp": "True"}  # llama-2-7b
TOKENS = (1, 2, 4, 8, 16, 32, 64)


def op_ms(op_index: int, tokens: int, tp: int) -> float:
    """A made-up but distinct time for every operator, token count and degree."""
    return (op_index + 1) * 0.001 + tokens * 0.0005 / tp


def write_mlp(path, degrees=(1, 2), drop_column=None):
    columns = [median(op) for op in (*DENSE_OPS, "emb")] + list(SHAPE) + ["num_tokens", "num_tensor_parallel_workers"]
    columns = [c for c in columns if c != drop_column]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, columns, extrasaction="ignore")
        out.writeheader()
        for tp in degrees:
            for tokens in TOKENS:
                row = {median(op): op_ms(i, tokens, tp) for i, op in enumerate((*DENSE_OPS, "emb"))}
                out.writerow(row | SHAPE | {"num_tokens": tokens, "num_tensor_parallel_workers": tp})


def decode_ms(batch: int, kv: int) -> float:
    """A decode kernel that the fit's family holds exactly: per sequence and per KV token, both linear in
    the batch between knots 1, 4, 16 (16 being the largest batch measured)."""
    per_seq = np.dot(knot_weights((1.0, 4.0, 16.0), batch), (0.004, 0.002, 0.001))
    per_token = np.dot(knot_weights((1.0, 4.0, 16.0), batch), (2e-5, 1.5e-5, 1e-5))
    return batch * (per_seq + per_token * (kv + 1))


def prefill_ms(chunk: int, kv: int) -> float:
    return 0.01 + 1e-4 * chunk + 2e-7 * (chunk * kv + chunk * (chunk + 1) / 2)


def write_attention(path):
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["n_embd", "n_q_head", "n_kv_head", "num_tensor_parallel_workers", "batch_size", "kv_cache_size",
                      "prefill_chunk_size", "is_prefill", median("attn_prefill"), median("attn_decode"),
                      median("attn_output_reshape")])
        for batch in (1, 2, 4, 8, 12, 16):
            for kv in (64, 512, 2048):
                out.writerow([4096, 32, 32, 1, batch, kv, 0, False, "", decode_ms(batch, kv) - 0.001, 0.001])
        for chunk, kv in ((64, 0), (512, 0), (1024, 0), (512, 1024), (2048, 0), (256, 256)):
            out.writerow([4096, 32, 32, 1, 1, kv, chunk, True, prefill_ms(chunk, kv) - 0.001, "", 0.001])


def write_all_reduce(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow([median("all_reduce"), "num_workers", "size", "collective", "devices_per_node"])
        for i, size in enumerate(range(8192, 8192 * 40, 8192)):
            outlier = 0.05 if i == 20 else 0.0  # one bimodal small-message time, which the running median drops
            out.writerow([0.02 + size * 1e-9 + outlier, 2, size, "all_reduce", 2])
            out.writerow([9.0, 2, size, "all_reduce", 1])  # across servers: not this server's own rows


@pytest.fixture
def folder(tmp_path):
    """A Vidur-format folder with one device, h100, and Llama-2-7B's shape."""
    root = tmp_path / "vidur"
    model_dir = root / "compute" / "h100" / "meta-llama" / "Llama-2-7b-hf"
    write_mlp(model_dir / "mlp.csv")
    write_attention(model_dir / "attention.csv")
    write_all_reduce(root / "network" / "h100_dgx" / "all_reduce.csv")
    return root


def test_dense_layer_is_the_sum_of_the_operators_interpolated_by_tokens(folder):
    m = load_model("llama-2-7b")
    cm = CostModel(load_hardware(folder), m)
    at = {t: sum(op_ms(i, t, 1) for i in range(len(DENSE_OPS))) * 1e-3 for t in TOKENS}
    assert cm.measured.profile.dense(8) == pytest.approx(at[8], rel=1e-12)
    assert cm.measured.profile.dense(6) == pytest.approx((at[4] + at[8]) / 2, rel=1e-12)
    batch = BatchShape.of(decodes=[100] * 6)
    expected = (at[4] + at[8]) / 2 + 1e-3 * decode_ms(6, 100)
    assert cm.layer_time(batch) == pytest.approx(expected, rel=1e-9)
    # outside the layers: the roofline's head and host time, plus the measured embedding
    emb = (len(DENSE_OPS) + 1) * 1e-6 + 6 * 0.0005e-3
    assert cm.head_time(batch) == pytest.approx(cm.roofline.head_time(batch) + emb, rel=1e-12)


def test_attention_fit_recovers_a_model_of_its_family_exactly(folder):
    fit = attention_fit(read_attention(folder / "compute/h100/meta-llama/Llama-2-7b-hf/attention.csv"),
                        load_model("llama-2-7b"), 1)
    assert fit.decode.knots == (1.0, 4.0, 16.0)
    for batch, kv in ((3, 700), (10, 1500), (16, 64)):
        assert fit(BatchShape.of(decodes=[kv] * batch)) == pytest.approx(decode_ms(batch, kv) * 1e-3, rel=1e-6)
    assert fit(BatchShape.of(prefills=[(700, 300)])) == pytest.approx(prefill_ms(700, 300) * 1e-3, rel=1e-6)
    # a mixed batch: the decode and the prefill kernels, each on its own share of the sums
    mixed = BatchShape.of(prefills=[(700, 300)], decodes=[1500] * 10)
    assert fit(mixed) == pytest.approx((prefill_ms(700, 300) + decode_ms(10, 1500)) * 1e-3, rel=1e-6)


def test_beyond_the_measured_batch_attention_extends_its_fit_with_one_warning(folder):
    cm = CostModel(load_hardware(folder), load_model("llama-2-7b"))
    with pytest.warns(ProfileWarning, match=r"attention\.csv: column 'batch_size' measured up to 16, a batch needs 40"):
        cm.layer_time(BatchShape.of(decodes=[100] * 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.layer_time(BatchShape.of(decodes=[100] * 50))  # once per file and column


def test_all_reduce_is_the_servers_own_rows_smoothed_and_interpolated(folder):
    (folder / "compute/h100/meta-llama/Llama-2-7b-hf/attention.csv").unlink()  # it has one GPU only
    cm = CostModel(load_hardware(folder), load_model("llama-2-7b"), tp=2)
    curve = cm.measured.profile.all_reduce
    assert curve.xs[0] == 8192 and len(curve.xs) == 39
    # the outlier (+0.05 ms) is gone: a running median of a ramp is the ramp, within a neighbour's step
    assert curve(8192 * 21) == pytest.approx((0.02 + 8192 * 21 * 1e-9) * 1e-3, rel=1e-3)
    tokens = 10  # 10 x 4096 x 2 bytes = 81920 = 8192 x 10
    assert cm.all_reduce_time(tokens) == pytest.approx((0.02 + 81920e-9) * 1e-3, rel=1e-9)
    dense = sum(op_ms(i, 10, 2) for i in range(len(DENSE_OPS))) * 1e-3
    assert cm.measured.dense_time(tokens) == pytest.approx(dense + 2 * cm.all_reduce_time(tokens), rel=1e-12)


def test_decode_time_is_iteration_time(folder):
    cm = CostModel(load_hardware(folder), load_model("llama-2-7b"))
    for n, context in ((1, 50), (7, 300), (12, 2000)):
        batch = BatchShape.of(decodes=[context] * n)
        assert cm.decode_time(n, batch.attended_pairs, batch.padded_pairs) == cm.iteration_time(batch)


def test_shapes_and_degrees_the_profile_lacks_are_refused_naming_file_column_and_value(folder):
    cm = CostModel(load_hardware(folder), load_model("llama-2-7b"))
    with pytest.raises(CatalogError, match=r"mlp\.csv: column 'num_tokens' has no measurement at 100 \(measured 1 to 64\)"):
        cm.layer_time(BatchShape.of(prefills=[(100, 0)]))
    with pytest.raises(CatalogError, match=r"mlp\.csv: column 'num_tensor_parallel_workers' has no rows for 4 \(has 1, 2\)"):
        CostModel(load_hardware(folder), load_model("llama-2-7b"), tp=4)
    with pytest.raises(CatalogError, match=r"attention\.csv: column 'num_tensor_parallel_workers' has no rows for 2 \(has 1\)"):
        CostModel(load_hardware(folder), load_model("llama-2-7b"), tp=2)


def test_a_missing_column_or_model_is_refused_naming_the_file(folder):
    mlp = folder / "compute/h100/meta-llama/Llama-2-7b-hf/mlp.csv"
    write_mlp(mlp, drop_column=median("mlp_act"))
    with pytest.raises(CatalogError, match=re.escape(f"{mlp}: missing column 'time_stats.mlp_act.median'")):
        CostModel(load_hardware(folder), load_model("llama-2-7b"))
    with pytest.raises(CatalogError, match=r"no mlp\.csv for llama-2-13b .*it has: meta-llama/Llama-2-7b-hf \(32, 32, 4096, 11008, True\)"):
        CostModel(load_hardware(folder), load_model("llama-2-13b"))


def test_bad_profile_sections_are_refused_naming_the_field(folder, write):
    path = write("mine.toml", f'base = "{VIDUR_BASES["h100"]}"\n[profile]\nvidur = "{folder}"\ndevice = "b200"\n')
    with pytest.raises(CatalogError, match=r"mine\.toml: field 'profile\.device': no folder .*compute/b200"):
        load_hardware(path)
    path = write("mine.toml", f'base = "{VIDUR_BASES["h100"]}"\n[profile]\nvidur = "{folder}"\ndevice = "h100"\n'
                              f'network = "h100_pcie"\n')
    with pytest.raises(CatalogError, match=r"field 'profile\.network': no folder"):
        load_hardware(path)
    two = folder / "compute" / "a100"
    two.mkdir()
    with pytest.raises(CatalogError, match=r"needs one device under compute/ among a100, h100 \(it has: a100, h100\)"):
        load_hardware(folder)


def test_the_command_line_prints_a_profile_error_whole(folder, tmp_path, capsys):
    (folder / "compute" / "a100").mkdir()
    assert main(["run", "--hw", str(folder), "--model", "llama-2-7b", "--out", str(tmp_path / "out")]) == 2
    assert 'write a hardware TOML with base = "<catalog entry>" and a [profile] of vidur' in capsys.readouterr().out


def test_a_toml_with_a_base_and_a_relative_profile_is_the_folder_form(folder, write):
    text = f'base = "{VIDUR_BASES["h100"]}"\ndescription = "mine"\n[profile]\nvidur = "vidur"\ndevice = "h100"\n' \
           f'network = "h100_dgx"\n[gpu]\nlayer_overhead_us = 1\n'
    mine = load_hardware(write("mine.toml", text))  # tmp_path/mine.toml: "vidur" is tmp_path/vidur
    folder_form = load_hardware(folder)
    assert mine.profile == folder_form.profile and mine.description == "mine"
    assert mine.gpu.layer_overhead == 1e-6 and folder_form.gpu == load_hardware(VIDUR_BASES["h100"]).gpu
    assert mine.link == folder_form.link and mine.server == folder_form.server


def test_shipped_profile_matches_its_csv_read_independently():
    """The a100 Llama-2-7B layer at 512 tokens on one GPU, and Llama-2-70B's on 8: the shipped CSV's medians
    summed by hand (the csv module, no Pie code) against the cost model."""
    cm7 = CostModel(load_hardware("a100-80g-sxm-8x-nvlink-vidur"), load_model("llama-2-7b"))
    cm70 = CostModel(load_hardware("a100-80g-sxm-8x-nvlink-vidur"), load_model("llama-2-70b"), tp=8)
    for cm, name, tp in ((cm7, "Llama-2-7b-hf", 1), (cm70, "Llama-2-70b-hf", 8)):
        with open(SHIPPED / "compute/a100/meta-llama" / name / "mlp.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["num_tokens"] == "512" and r["num_tensor_parallel_workers"] == str(tp)]
        by_hand = sum(float(r[f"time_stats.{op}.median"]) for r in rows for op in DENSE_OPS) / len(rows) * 1e-3
        assert cm.measured.profile.dense(512) == pytest.approx(by_hand, rel=1e-12)
    assert CostModel(load_hardware("h100-sxm-8x-nvlink-vidur"), load_model("llama-2-70b"), tp=8).measured.profile.attention is None


def test_table_refuses_a_value_that_is_not_a_number(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(CatalogError, match=r"x\.csv: column 'b' line 3: not a number: 'oops'"):
        Table.read(path, ("a", "b")).number("b")


def test_copies_slow_a_measured_layer_as_they_slow_the_rooflines_kernels(folder, write):
    """On a 2-GPU server with no all-reduce figures of its own: the profile's all-reduces are the only ones."""
    (folder / "compute/h100/meta-llama/Llama-2-7b-hf/attention.csv").unlink()
    text = (DATA / "tiny-hw.toml").read_text().replace("num_gpus = 1", "num_gpus = 2")
    hw = load_hardware(write("two.toml", text + f'\n[profile]\nvidur = "{folder}"\ndevice = "h100"\nnetwork = "h100_dgx"\n'))
    cm = CostModel(hw, load_model("llama-2-7b"), tp=2)
    batch = BatchShape.of(decodes=[30] * 8)
    r = cm.roofline
    kernels = [r.gemm_time(8, bw) + r.elementwise_time(8, bw) + r.attention_time(batch, bw) + hw.gpu.layer_overhead
               for bw in (0.0, 4e9)]
    assert cm.layer_time(batch, copy_bandwidth=4e9) == pytest.approx(cm.layer_time(batch) * kernels[1] / kernels[0], rel=1e-12)
    assert kernels[1] > kernels[0]
