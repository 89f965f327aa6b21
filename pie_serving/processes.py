"""Child processes that die with the command that started them: the worker pools of `pie-sim` (sweep,
capacity, reproduce), its plotting process and `pie-exec`'s pipeline stages. A child is killed when its
parent dies, even by SIGKILL (Linux: PR_SET_PDEATHSIG; elsewhere a thread that watches the parent), and a
parent interrupted by Ctrl-C or SIGTERM kills its workers at once instead of waiting for their work."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def die_with_parent(parent: int) -> None:
    """Call first in a child: it is killed as soon as process `parent` (the one that started it) dies. The
    child takes the default SIGTERM back (a command turns it into an exception for its own cleanup)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    armed = sys.platform == "linux" and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG,
                                                                               signal.SIGKILL) == 0
    if not armed:
        threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the line above could take effect
        os._exit(1)


def _start_worker(parent: int, then: Callable[[], None] | None) -> None:
    die_with_parent(parent)
    if then is not None:
        then()


def kill_children() -> None:
    """Kill every child process this one started through multiprocessing, and reap them."""
    for child in multiprocessing.active_children():
        child.kill()
    for child in multiprocessing.active_children():
        child.join()


@contextmanager
def worker_pool(workers: int, initializer: Callable[[], None] | None = None) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` forked processes (they start with this one's modules) that die with this process;
    on an exception here (an error, Ctrl-C, SIGTERM) they are killed at once and the work queued is dropped."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_worker,
                               initargs=(os.getpid(), initializer))
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        kill_children()
        raise
    pool.shutdown()
