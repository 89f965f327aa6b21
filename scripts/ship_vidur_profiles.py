"""Rebuild hwmodels/profiles/vidur/ from a copy of Vidur's published profiles (MIT licence, kept with them).

    python scripts/ship_vidur_profiles.py SOURCE_FOLDER

SOURCE_FOLDER is laid out as Vidur's `data/profiling/` (plus `attention_points.csv`, the rows of an
`attention.csv` with short column names). Every row is kept; of the measured statistics only the medians
(what Pie reads), so that the shipped files stay small. `attention_points.csv` is written back with
Vidur's `attention.csv` column names. LICENSE is copied as it is; README.md there (the attribution and
what was kept) is written by hand.
"""
from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

DEST = Path(__file__).resolve().parent.parent / "hwmodels" / "profiles" / "vidur"
NETWORKS = ("a100_dgx", "h100_dgx")   # the 8-GPU NVSwitch servers the catalog models
ATTENTION = {"batch": "batch_size", "kv": "kv_cache_size", "chunk": "prefill_chunk_size"}
# What the rows of attention_points.csv share (its header says so): Llama-2-7B, TP 1, block 16, fp16.
ATTENTION_SHAPE = {"n_embd": 4096, "n_q_head": 32, "n_kv_head": 32, "block_size": 16,
                   "num_tensor_parallel_workers": 1, "max_model_len": 4096}


def keep_medians(source: Path, dest: Path) -> None:
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in rows[0] if c and not (c.startswith("time_stats.") and not c.endswith(".median"))]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        out = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        out.writeheader()
        out.writerows(rows)


def attention_csv(source: Path, dest: Path) -> None:
    lines = [line for line in source.read_text().splitlines() if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    columns = [*ATTENTION_SHAPE, *ATTENTION.values(), "is_prefill", "time_stats.attn_prefill.median",
               "time_stats.attn_decode.median", "time_stats.attn_input_reshape.median",
               "time_stats.attn_output_reshape.median"]
    with open(dest, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(columns)
        for r in rows:
            prefill = r["kind"] == "prefill"
            out.writerow([*ATTENTION_SHAPE.values(), *(r[k] for k in ATTENTION), str(prefill),
                          r["attn_ms"] if prefill else "", "" if prefill else r["attn_ms"], "0.0", r["reshape_ms"]])


def main(source: Path) -> None:
    for folder in ("compute", "network"):
        shutil.rmtree(DEST / folder, ignore_errors=True)
    for path in sorted((source / "compute").glob("*/*/*/mlp.csv")):
        keep_medians(path, DEST / path.relative_to(source))
    for path in sorted((source / "compute").glob("*/*/*/attention_points.csv")):
        attention_csv(path, DEST / path.relative_to(source).with_name("attention.csv"))
    for network in NETWORKS:
        keep_medians(source / "network" / network / "all_reduce.csv", DEST / "network" / network / "all_reduce.csv")
    shutil.copyfile(source / "LICENSE", DEST / "LICENSE")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
