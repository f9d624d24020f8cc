"""Start the ranks of a gloo test as processes (``python -m <module> RANK WORLD PORT OUT``) and wait for them: each
must exit 0 (its log's tail is the assertion message), or all are killed at the timeout."""
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_gloo_stopped() -> None:
    """In a rank after ``destroy_process_group``: gloo's threads are gone (Linux, where they are named), i.e. nothing
    still holds the group; else they can abort the process as the interpreter shuts down (docs/distributed.md)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return
    names = []
    for t in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, t, "comm")) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    left = [n for n in names if "gloo" in n]
    assert not left, f"gloo threads outlive destroy_process_group: {left}"


def run_ranks(module: str, world: int, out, timeout: float, **extra_env) -> None:
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **extra_env)
    procs = [subprocess.Popen([sys.executable, "-m", module, str(r), str(world), str(port), str(out)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    logs = []
    for p in procs:
        try:
            log, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(log.decode(errors="replace"))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
