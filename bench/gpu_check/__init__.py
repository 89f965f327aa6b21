"""Pie's GPU check: one command that proves the executor and the simulator on a GPU and brings back every
figure that matters (how to run it, carry it and read it on a Grace Hopper: README.md beside this file).

    python -m bench.gpu_check --out DIR [--device cuda|cpu] [--quick] [--model M] [--serving-model M]
                              [--hw ENTRY] [--steps a,b,...] [--budget-s 480]

Steps, in order, each in a process of its own (steps.py; expected seconds on one H100, ESTIMATED: no GPU
run has been made yet): env 10, tokens 60, cuda-tests 45, bandwidth 15, overlap 100, calibrate 70,
validate 80 — about 6.5 minutes of the 8-minute budget. A step that fails records its error and the
others still run; one that overruns its limit (three times its estimate, within what the later steps
need) is stopped; one the budget has no time left for is not started. `--device cpu` is a dry run of the
same code on tiny sizes (the test suite runs it).

DIR holds, all small (tens of kB, the plot ~50 kB):
    summary.md        the report (format below)
    log.txt           everything the steps printed (tracebacks, calibrate's and validate's tables)
    env.csv           key, value: the machine, the hardware entry's link figures, pinning
    tokens.csv        model, dtype, case, ordering, tokens, argmax_equal, near_ties, max_logit_error,
                      tolerance, identical_sequences, requests, preemptions, bytes_h2d, bytes_d2h, verdict,
                      seconds
    cuda_tests.csv    test, outcome, seconds, message
    bandwidth.csv     what, bytes_per_call, calls, bytes_h2d, bytes_d2h, seconds, gb_s, us_per_call; then
                      the fits ("fit: h2d GB/s", ...) in `what` with their value in gb_s
    overlap.csv       config, share, cpu_block_share, depth, ordering, background, iterations, iteration_ms,
                      wall_ms, stall_ms, layers_ms, slowdown, h2d_mb, h2d_busy_gb_s,
                      predicted_iteration_ms, predicted_stall_ms, predicted_layers_ms, predicted_slowdown,
                      background_gb_s
    calibrate/        profile.toml (a hardware profile for pie-sim --hw), profile.csv, the model TOML
    validate/         validate.csv, validate.png (pie-validate's)

summary.md, in this order:
    # Pie GPU check
    - device: the GPU (memory), torch and CUDA versions, the host
    - compared with: the hardware entry; the two models; --quick if given
    - command: the exact command line
    - started (UTC), seconds taken, the budget, how many steps ended ok or skipped
    ## Steps
    | step | status | seconds | expected on one H100 (estimated) | limit s | what | note |
        status: ok, FAILED (a check did not hold), ERROR (an exception: its traceback's end follows in
        the step's section), TIMEOUT, NOT RUN (no time left), skipped (no CUDA device for the CUDA tests,
        or a step it needs did not succeed)
    ## <step>, one section a step: its status and note unless ok, its tables, the files it wrote
        env         the facts, one row each
        tokens      per model and dtype: cases ok, tokens, near ties, largest logit difference, tolerance,
                    sequences identical to transformers' generate; every failed case by name
        cuda-tests  every test with its outcome
        bandwidth   GB/s and µs a call by direction at the smallest and largest sizes, pageable, d2d; the
                    fitted link against the hardware entry
        overlap     per configuration: iteration, stall and layer times, compute slowdown, link rate, the
                    simulator's iteration and stall for the same plans; the two copy orderings side by
                    side; compute under background copies, per 100 GB/s, against the simulator's charge
        calibrate   the fits' residuals; the copier's link against the hardware entry
        validate    measured / predicted / error of throughput, e2e, TPOT, iteration time and bytes moved,
                    per policy
The command exits 0 when every step is ok or skipped, 1 otherwise, and 2 (one line on stderr, nothing
written) for input it refuses: --device cuda without a CUDA device, a model that does not fit the GPU
(from the catalogs' sizes, before anything is allocated), an --out that exists and is not empty.
"""
