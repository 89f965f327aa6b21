"""Children die with their parent: the worker pools (sweep, capacity, reproduce), the plotting process and the
pipeline's stage processes, whether the parent is killed (SIGKILL) or asked to stop (SIGTERM, Ctrl-C)."""
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")


def children(pid: int) -> set[int]:
    """The live processes `pid` started (Linux: /proc/PID/task/*/children)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def _as_from_a_shell() -> None:
    """The child's signals as a shell leaves them (default handlers, none blocked), whatever the test
    process's threads left behind: inherited through exec, a blocked SIGINT would swallow the Ctrl-C."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start(code_or_argv, **kwargs) -> subprocess.Popen:
    argv = [sys.executable, "-c", textwrap.dedent(code_or_argv)] if isinstance(code_or_argv, str) else \
        [sys.executable, "-m", *code_or_argv]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_shell, **kwargs)


def kill_and_check(process: subprocess.Popen, how: signal.Signals, want: int, seconds: float) -> set[int]:
    """Wait until `process` has `want` children, send it `how`; returns them. They must be gone within
    `seconds` (a few: killing and reaping, not finishing their work)."""
    assert wait_for(lambda: len(children(process.pid)) >= want, 120), "the children never started"
    kids = children(process.pid)
    process.send_signal(how)
    process.wait(timeout=60)
    assert wait_for(lambda: not any(alive(k) for k in kids), seconds), f"{how.name}: children {kids} outlived the parent"
    return kids


POOL = """
    import time
    from pie_serving.processes import worker_pool
    with worker_pool(2) as pool:
        futures = [pool.submit(time.sleep, 600) for _ in range(4)]
        time.sleep(600)
"""


def test_pool_workers_die_when_their_parent_is_killed():
    kill_and_check(start(POOL), signal.SIGKILL, 2, 5)


def test_pool_workers_are_killed_when_the_command_is_terminated():
    """SIGTERM: the command's cleanup runs (one line, status 143) and the workers, busy for minutes, go at once."""
    process = start("""
        import sys, time
        from pie_serving.options import run_command
        from pie_sim.parallel import run_parallel
        sys.exit(run_command("prog", lambda console: run_parallel(time.sleep, [600] * 4, console, "x", 2), ()))
    """)
    kill_and_check(process, signal.SIGTERM, 2, 5)
    assert process.returncode == 143 and process.stdout.read().strip() == "prog: terminated"
    assert "Traceback" not in process.stderr.read()


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_sweeps_workers_die_with_it(tmp_path, how):
    grid = tmp_path / "grid.toml"
    grid.write_text('policy = ["vllm", "pie", "static", "vllm-swap"]\nnum_requests = 20000\ntrace = "sharegpt"\n'
                    'model = ["opt-13b", "opt-30b"]\n')
    process = start(["pie_sim", "sweep", str(grid), "--out", str(tmp_path / "out"), "--workers", "2"])
    kill_and_check(process, how, 2, 10)


@pytest.mark.slow
def test_the_painter_dies_with_a_killed_run(tmp_path):
    # --layer-events: one SimPy event per layer, so the run outlasts the signal however fast the machine
    process = start(["pie_sim", "run", "--num-requests", "5000", "--layer-events", "--out", str(tmp_path / "out")])
    kill_and_check(process, signal.SIGKILL, 1, 10)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_pipeline_stages_die_with_a_terminated_run(tmp_path):
    process = start(["pie_exec", "run", "--pipeline-stages", "2", "--num-requests", "200", "--rate", "inf",
                     "--threads", "1", "--out", str(tmp_path / "out")])
    # a stage killed before it has read what spawn sends it prints multiprocessing's own traceback, before
    # any of Pie's code runs: the run is terminated once its stages are up
    assert wait_for(lambda: len(children(process.pid)) >= 2, 120)
    time.sleep(5)
    kill_and_check(process, signal.SIGTERM, 2, 10)
    assert process.returncode == 143 and not (tmp_path / "out").exists()
    assert "Traceback" not in process.stderr.read()


def test_ctrl_c_of_a_run_is_one_line(tmp_path):
    # --layer-events: one SimPy event per layer, so the run outlasts the signal however fast the machine
    process = start(["pie_sim", "run", "--num-requests", "5000", "--layer-events", "--out", str(tmp_path / "out")])
    assert wait_for(lambda: len(children(process.pid)) >= 1, 120)  # the painter: the run has started
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert process.returncode == 130 and "Traceback" not in process.stderr.read()
    assert process.stdout.read().strip().endswith("pie-sim: interrupted") and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
