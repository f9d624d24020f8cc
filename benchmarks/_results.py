"""The provenance every result file records (command line, commit, machine) and the one way the estimator
studies write their JSON and plot."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent


def write_result(argv, args, payload: dict, plot: Optional[Callable[[dict, str], None]] = None,
                 **machine) -> dict:
    """``{"command", "commit", "args", "machine", **payload}``; written to ``args.out`` when given, with
    ``plot(result, <out>.png)`` when ``args.plot``. ``machine``: extra fields of the machine record."""
    import torch
    from fastgrad._env import _cpu

    cpu, features = _cpu()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    result = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
              "commit": commit, "args": vars(args),
              "machine": {"node": platform.node(), "cpu": cpu, "cpu_features": features, "cores": os.cpu_count(),
                          "torch": torch.__version__, **machine},
              **payload}
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        if plot is not None and getattr(args, "plot", False):
            plot(result, os.path.splitext(args.out)[0] + ".png")
    return result
