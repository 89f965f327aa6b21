"""The simulator installs and runs without PyTorch: nothing it imports imports torch (the executor's `exec`
extra), and the executor says what to install when torch is missing."""
import subprocess
import sys

from .conftest import REPO

BLOCK = "import sys; sys.modules.update(dict.fromkeys(('torch', 'safetensors', 'transformers')))"  # import fails


def run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"{BLOCK}; {code}", *args], cwd=REPO, capture_output=True,
                          text=True, env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"})


def test_pie_sim_runs_without_torch(tmp_path):
    result = run_without_torch("from pie_sim.cli import main; sys.exit(main(sys.argv[1:]))", "run", "--model",
                               "opt-1.3b", "--num-requests", "20", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "summary.json").is_file()


def test_pie_exec_without_torch_says_what_to_install():
    result = run_without_torch("import pie_exec.cli")
    assert result.returncode == 1 and "the executor needs PyTorch: bash scripts/install.sh exec" in result.stderr
