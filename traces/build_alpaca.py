"""Build traces/data/alpaca_synthetic_lengths.csv -- SYNTHETIC Alpaca request lengths.

This file is SYNTHETIC: no Alpaca text or real per-request lengths went into it.
The Alpaca raw data cannot be fetched here (no network beyond PyPI), so we
generate a stand-in whose only fitted facts are the published means from the
vLLM paper (Kwon et al., SOSP'23, Sec. 6.1; OPT tokenizer): mean input 19.31
tokens, mean output 58.45 tokens, and Alpaca's size, 52,002 requests.

Assumed shape (a judgement call, not measured): each column is an independent
lognormal, rounded to an integer and floored at 1, with sigma 0.6 for inputs
(short instructions, tightly spread) and sigma 1.0 for outputs (one-word
answers to multi-paragraph essays, heavy right tail).  Lengths are clipped to
the ShareGPT limits (prompt <= 1024, prompt + output <= 2048, imported from build_sharegpt).  Given sigma and
the seeded normal draws (numpy default_rng(0)), mu is solved by bisection so the
generated mean equals the published mean; the script asserts a match within 1%.
Reproducible bit-for-bit when re-run.

Run from the repo root:  python -m traces.build_alpaca
"""
from pathlib import Path

import numpy as np

from traces.build_sharegpt import MAX_PROMPT_TOKENS, MAX_TOTAL_TOKENS, write_lengths

N_ROWS = 52_002                        # size of the Alpaca dataset
TARGET_MEAN_PROMPT = 19.31             # vLLM paper, Alpaca mean input length
TARGET_MEAN_OUTPUT = 58.45             # vLLM paper, Alpaca mean output length
SIGMA_PROMPT = 0.6                     # assumed lognormal sigma (log-space std)
SIGMA_OUTPUT = 1.0
SEED = 0
OUT_CSV = Path(__file__).resolve().parent / "data" / "alpaca_synthetic_lengths.csv"


def lengths(z, mu, sigma, cap):
    """Discretised lognormal: round(exp(mu + sigma*z)), at least 1, at most cap."""
    return np.clip(np.rint(np.exp(mu + sigma * z)), 1, cap).astype(np.int64)


def solve_mu(z, sigma, cap, target):
    """Bisect mu so that mean(lengths) == target (the mean is monotone in mu)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if lengths(z, mid, sigma, cap).mean() < target:
            lo = mid
        else:
            hi = mid
    # pick whichever end of the final bracket lands closer to the target
    return min((lo, hi), key=lambda m: abs(lengths(z, m, sigma, cap).mean() - target))


def main():
    rng = np.random.default_rng(SEED)
    z_prompt = rng.standard_normal(N_ROWS)
    z_output = rng.standard_normal(N_ROWS)

    mu_p = solve_mu(z_prompt, SIGMA_PROMPT, MAX_PROMPT_TOKENS, TARGET_MEAN_PROMPT)
    prompt = lengths(z_prompt, mu_p, SIGMA_PROMPT, MAX_PROMPT_TOKENS)
    out_cap = MAX_TOTAL_TOKENS - prompt   # per-row cap keeps prompt + output <= 2048
    mu_o = solve_mu(z_output, SIGMA_OUTPUT, out_cap, TARGET_MEAN_OUTPUT)
    output = lengths(z_output, mu_o, SIGMA_OUTPUT, out_cap)

    for name, col, target in (("prompt", prompt, TARGET_MEAN_PROMPT),
                              ("output", output, TARGET_MEAN_OUTPUT)):
        assert abs(col.mean() - target) / target < 0.01, (name, col.mean(), target)
    assert prompt.min() >= 1 and output.min() >= 1
    assert prompt.max() <= MAX_PROMPT_TOKENS and (prompt + output).max() <= MAX_TOTAL_TOKENS

    write_lengths(OUT_CSV, zip(prompt.tolist(), output.tolist()))

    print(f"rows: {N_ROWS}  (SYNTHETIC)")
    print(f"prompt: mu={mu_p:.4f} sigma={SIGMA_PROMPT} mean={prompt.mean():.2f} "
          f"(target {TARGET_MEAN_PROMPT}) median={np.median(prompt):.0f} max={prompt.max()}")
    print(f"output: mu={mu_o:.4f} sigma={SIGMA_OUTPUT} mean={output.mean():.2f} "
          f"(target {TARGET_MEAN_OUTPUT}) median={np.median(output):.0f} max={output.max()}")
    print(f"wrote {OUT_CSV}")


if __name__ == "__main__":
    main()
