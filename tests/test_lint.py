"""The linters as part of the suite, so that CI runs them with the tests: ruff over the tree (its rules in
pyproject.toml), and mypy over the packages whose interfaces the others build on (the policy, the serving
loop and records, the hardware and cost models, the workloads)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPED = ("pie_policy", "pie_serving", "hwmodels", "traces")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing():
    result = _run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_finds_nothing_in_the_typed_packages():
    result = _run("mypy", "--ignore-missing-imports", "--no-incremental", *TYPED)
    assert result.returncode == 0, result.stdout + result.stderr
