"""Start the ranks of a gloo test as processes (``python -m <module> RANK WORLD PORT OUT``) and wait for them: each
must exit 0 (its log's tail, from ``OUT/rank{r}.log``, is the assertion message), or all are killed at the
timeout."""
import os
import socket
import subprocess
import sys
import time

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
    while (left := _gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left, f"gloo threads outlive destroy_process_group: {left}"


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
    try:
        for p in procs:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        raise
    for p, log in zip(procs, logs):
        with open(log, errors="replace") as f:
            assert p.returncode == 0, f.read()[-3000:]
