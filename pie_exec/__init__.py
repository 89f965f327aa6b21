"""Pie's real executor: runs pie_policy's plans with PyTorch on a GPU or, exactly but slower, the CPU."""
import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, so that timings hold up on a
# machine with few cores where anything else runs (spinning threads stalled operations by 7-55 ms).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
