"""`pie-exec run`: its files, and bad input refused clearly with nothing passed off as complete."""
import csv
import json
import time

import pytest
import torch

from pie_exec.cli import main as pie_exec
from pie_exec.model import ArchDetails
from pie_exec.weights import random_transformer, save_hf_folder

from .test_exec_engine import SPECS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    spec = SPECS["llama"]
    return save_hf_folder(random_transformer(spec, seed=3), spec, ArchDetails(), tmp_path_factory.mktemp("llama"))


def test_run_writes_the_simulator_files_and_tokens(folder, write, tmp_path):
    prompts = write("p.jsonl", '{"id": "a", "prompt_token_ids": [1, 2, 3], "max_new_tokens": 5}\n\n'
                               '{"id": 7, "prompt_token_ids": [9, 8, 7, 6, 5, 4], "max_new_tokens": 3}\n')
    out = tmp_path / "out"
    assert pie_exec(["run", "--model-path", str(folder), "--prompts", str(prompts), "--policy", "pie",
                     "--gpu-kv-gb", "0.01", "--seed", "5", "--out", str(out)]) == 0
    tokens = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [t["id"] for t in tokens] == ["a", 7] and [len(t["output_token_ids"]) for t in tokens] == [5, 3]
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["finished", "finished"] and rows[0]["output_tokens"] == "5"
    assert [r["id"] for r in rows] == ["a", "7"]  # each prompt's id, as tokens.jsonl has it
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 2 and summary["backend"] == "exec" and summary["throughput_tok_s"] > 0
    assert (summary["hw"], summary["trace"], summary["rate"], summary["seed"]) == ("cpu-host", str(prompts), None, 5)
    with open(out / "iterations.csv") as f:
        assert sum(int(r["decode_tokens"]) for r in csv.DictReader(f)) == 4 + 2  # tokens after the first


def test_run_a_trace(folder, tmp_path):
    out = tmp_path / "out"
    assert pie_exec(["run", "--model-path", str(folder), "--trace", "alpaca", "--num-requests", "4",
                     "--rate", "inf", "--policy", "static", "--gpu-kv-gb", "0.01", "--out", str(out)]) == 0
    assert len((out / "tokens.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("make, args, message", [
    (lambda d, w: d / "nowhere", [], "nowhere"),
    (lambda d, w: d, ["--prompts", "LONG"], "line 2: prompt of 100 tokens + 40 new tokens exceeds the model's context of 128"),
    (lambda d, w: d, ["--prompts", "BADID"], "line 1: prompt_token_ids must be a non-empty list of token ids in [0, 256)"),
    (lambda d, w: d, ["--prompts", "OK", "--gpu-kv-gb", "0.00002"], "raise --gpu-kv-gb"),
])
def test_bad_input_is_refused_and_writes_nothing(folder, write, tmp_path, capsys, make, args, message):
    files = {"LONG": write("long.jsonl", '{"prompt_token_ids": [1], "max_new_tokens": 2}\n'
                                         + json.dumps({"prompt_token_ids": [1] * 100, "max_new_tokens": 40}) + "\n"),
             "BADID": write("bad.jsonl", '{"prompt_token_ids": [1, 999], "max_new_tokens": 2}\n'),
             "OK": write("ok.jsonl", json.dumps({"prompt_token_ids": [1] * 60, "max_new_tokens": 30}) + "\n")}
    args = [str(files.get(a, a)) for a in args]
    out = tmp_path / "out"
    code = pie_exec(["run", "--model-path", str(make(folder, write)), *args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 2 and message in printed, printed
    assert not out.exists()


def test_run_takes_a_config_json_or_a_model_folder_as_the_simulator_does(tmp_path):
    """--model reads a config.json or folder as pie-sim does (random weights from --seed); --model-path loads
    the folder's weights."""
    spec = SPECS["qwen2"]
    folder = save_hf_folder(random_transformer(spec, seed=3), spec, ArchDetails(), tmp_path / "tiny-qwen2")
    tokens = {}
    for name, model in (("config", ["--model", str(folder / "config.json")]), ("folder", ["--model", str(folder)]),
                        ("weights", ["--model-path", str(folder)])):
        out = tmp_path / name
        assert pie_exec(["run", *model, "--trace", "alpaca", "--num-requests", "3", "--rate", "inf",
                         "--gpu-kv-gb", "0.01", "--seed", "5", "--out", str(out)]) == 0
        assert json.loads((out / "summary.json").read_text())["model"] == "tiny-qwen2"
        tokens[name] = (out / "tokens.jsonl").read_text()
    assert tokens["config"] == tokens["folder"] != tokens["weights"]


def test_run_refuses_a_mixture_of_experts_by_name(tmp_path, capsys):
    out = tmp_path / "out"
    assert pie_exec(["run", "--model", "mixtral-8x7b", "--out", str(out)]) == 2
    assert "mixtral-8x7b: unsupported feature: a mixture of 8 experts" in capsys.readouterr().out
    assert not out.exists()
@pytest.mark.parametrize("content, message", [
    (b'{"id": "a", "prompt_token_ids": [1, 2], "max_new_tokens": 2}\n'
     b'{"id": "a", "prompt_token_ids": [3, 4], "max_new_tokens": 2}\n', "line 2: id 'a' repeats line 1's"),
    (b'{"prompt_token_ids": [1, 2], "max_new_tokens": 2, "id": "\xe9"}\n', "p.jsonl, line 1: not UTF-8 (byte 0xe9)"),
    (b'{"prompt_token_ids": [1, 2], "max_new_tokens": 2, "id": [1]}\n', "line 1: id must be a string or an integer"),
])
def test_a_bad_prompts_file_is_refused_naming_the_line(folder, tmp_path, capsys, content, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(content)
    out = tmp_path / "out"
    assert pie_exec(["run", "--model-path", str(folder), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert message in capsys.readouterr().out and not out.exists()


def test_a_non_float_tensor_is_refused(folder, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "int64"
    shutil.copytree(folder, copy)
    [weights] = copy.glob("*.safetensors")
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, weights)
    assert pie_exec(["run", "--model-path", str(copy), "--num-requests", "1", "--out", str(tmp_path / "o")]) == 2
    assert f"tensor '{key}' holds I64, not floating-point weights" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--gpu-kv-gb", "1e6"], "--gpu-kv-gb 1e+06 (1000000.00 GiB): more than the"),
    (["--cpu-kv-gb", "1000", "--policy", "vllm-swap"], "lower --cpu-kv-gb"),
    (["--model", "opt-175b"], "the weights of opt-175b at float32 (650.45 GiB): more than the"),
])
def test_memory_the_machine_lacks_is_refused_before_allocating(tmp_path, capsys, monkeypatch, args, message):
    """Against the memory available now (MemAvailable): refused in well under a second, naming what to lower."""
    monkeypatch.setattr("pie_exec.memory.host_available", lambda: 64 * 2**30)
    start = time.perf_counter()
    assert pie_exec(["run", "--num-requests", "1", *args, "--out", str(tmp_path / "o")]) == 2
    printed = capsys.readouterr().out
    assert message in printed and "64.00 GiB of host memory available" in printed, printed
    assert time.perf_counter() - start < 5 and not (tmp_path / "o").exists()


def test_the_pools_and_weights_together_must_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pie_exec.memory.host_available", lambda: 2**30)
    assert pie_exec(["run", "--num-requests", "1", "--gpu-kv-gb", "0.5", "--cpu-kv-gb", "0.4", "--policy",
                     "vllm-swap", "--out", str(tmp_path / "o")]) == 2
    printed = capsys.readouterr().out
    assert "the GPU KV pool (0.50 GiB) + the weights of opt-125m at float32 (0.47 GiB) + the CPU KV pool (0.40 GiB) " \
           "= 1.37 GiB: more than the 1.00 GiB of host memory" in printed, printed
    assert "lower --gpu-kv-gb; or choose a smaller --model or a narrower --dtype; or lower --cpu-kv-gb" in printed


def test_a_pool_that_holds_no_block_names_its_option(tmp_path, capsys):
    assert pie_exec(["run", "--num-requests", "1", "--gpu-kv-gb", "1e-6", "--out", str(tmp_path / "o")]) == 2
    assert "--gpu-kv-gb 1e-06 holds no KV block" in capsys.readouterr().out


def test_nothing_is_written_unless_the_run_finishes(folder, write, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("pie_exec.run.Serving", interrupted)
    prompts = write("p.jsonl", '{"prompt_token_ids": [1, 2], "max_new_tokens": 2}\n')
    assert pie_exec(["run", "--model-path", str(folder), "--prompts", str(prompts), "--out",
                     str(tmp_path / "o")]) == 130
    assert capsys.readouterr().out.strip() == "pie-exec: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
