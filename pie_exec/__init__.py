"""Pie's real executor: runs pie_policy's plans with PyTorch on a GPU or, exactly but slower, the CPU."""
