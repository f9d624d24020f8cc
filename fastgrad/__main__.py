"""``python -m fastgrad``: the version, the machine, and which backend runs (see :func:`fastgrad.collect_env`)."""
from ._env import report

print(report())
