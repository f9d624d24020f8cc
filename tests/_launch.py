"""Start the ranks of a gloo test as processes (``python -m <module> RANK WORLD PORT OUT``) and wait for them: each
must exit 0 (its log's tail, from ``OUT/rank{r}.log``, is the assertion message), or all are killed at the
timeout. The ranks import this module before ``init_process_group``, and with it ``torch._dynamo``: torch imports
that on a custom op's first call, and with it ``torch.distributed.nn.functional``, whose default arguments then keep
the default group alive past ``destroy_process_group``; its gloo threads can then abort the exiting process
(docs/distributed.md)."""
import gc
import os
import socket
import subprocess
import sys
import time

import torch._dynamo  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_threads() -> list:
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(os.path.join("/proc/self/task", t, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n]


def assert_gloo_stopped() -> None:
    """In a rank after ``destroy_process_group``: gloo's threads are gone (Linux, where they are named), i.e. nothing
    still holds the group; else they can abort the process as the interpreter shuts down (docs/distributed.md). A
    joined thread can stay listed for a moment, so this waits up to 2 s."""
    if not os.path.isdir("/proc/self/task"):
        return
    deadline = time.monotonic() + 2.0
    gc.disable()  # a group held only by a cycle would die in a collection here, and at exit only in the shutdown
    try:
        while (left := _gloo_threads()) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gc.enable()
    assert not left, f"gloo threads outlive destroy_process_group: {left}"


def exit_skipping_shutdown() -> None:
    """End a rank whose group something else still holds (a DTensor, a DDP model) once its results are written and
    ``destroy_process_group`` has run: without the interpreter's shutdown, which gloo's threads could abort."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(module: str, world: int, out, timeout: float, **extra_env) -> None:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **extra_env)
    # each rank's output to a file: a pipe nobody reads while waiting on another rank could fill and block it
    logs = [os.path.join(str(out), f"rank{r}.log") for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as f:
            procs.append(subprocess.Popen([sys.executable, "-m", module, str(r), str(world), str(port), str(out)],
                                          cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout

    def first_failed():
        return next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)

    while (failed := first_failed()) is None and any(p.poll() is None for p in procs) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    timed_out = failed is None and any(p.poll() is None for p in procs)
    for p in procs:  # a failed rank's peers wait in a collective that never completes: stop them
        if p.poll() is None:
            p.kill()
        p.wait()

    def tail(r):
        with open(logs[r], errors="replace") as f:
            return f"rank {r} (exit {procs[r].returncode}):\n" + f.read()[-3000:]

    if failed is not None:
        raise AssertionError(tail(failed))
    if timed_out:
        raise AssertionError(f"the {world} ranks of {module} did not finish in {timeout} s\n"
                             + "\n".join(tail(r) for r in range(world)))
