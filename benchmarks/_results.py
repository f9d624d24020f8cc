"""The provenance every result file records (command line, commit, machine) and the one way the estimator
studies write their JSON and plot."""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional


def write_result(argv, args, payload: dict, plot: Optional[Callable[[dict, str], None]] = None,
                 **machine) -> dict:
    """``{"command", "commit", "args", "machine", **payload}`` (the machine of :func:`fastgrad._env.machine_record`);
    written to ``args.out`` when given, with ``plot(result, <out>.png)`` when ``args.plot``. ``machine``: extra
    fields of the machine record."""
    from fastgrad._env import machine_record

    record = machine_record()
    commit = record.pop("commit")
    result = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
              "commit": commit, "args": vars(args), "machine": {**record, **machine}, **payload}
    if getattr(args, "out", None):
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        if plot is not None and getattr(args, "plot", False):
            plot(result, os.path.splitext(args.out)[0] + ".png")
    return result
