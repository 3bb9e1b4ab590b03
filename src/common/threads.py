"""OpenMP's wait policy for every entry point, set before torch loads its OpenMP runtime.

Between two parallel regions an OpenMP thread waits for the next one. By default it spins on its core for a
while (GNU libgomp: 300,000 spins; Intel libiomp: 200 ms), which is fastest on an idle machine. On a shared
one it is a trap: when another process holds a core, the threads that do run spin at every barrier waiting
for the one that was pre-empted, and a 2-thread step collapses far below a 1-thread one. Spinning only
briefly, then sleeping, keeps most of the idle-machine speed and lets a pre-empted thread catch up.

Both runtimes read these variables once, when the library loads (at `import torch`), so this module runs
first: src/__init__.py and benchmarks/__init__.py import it. A value the user set is kept.
"""

from __future__ import annotations

import os

# GOMP_SPINCOUNT: spins before a GNU OpenMP thread sleeps on a futex; KMP_BLOCKTIME: milliseconds an Intel
# OpenMP thread spins before it sleeps (the MKL / Intel builds of torch). OMP_WAIT_POLICY stays unset: PASSIVE
# would forbid spinning altogether (slower when the machine is idle), ACTIVE would spin without end.
WAIT_POLICY = {"GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "1"}


def set_openmp_wait_policy() -> dict[str, str]:
    """Short spin-then-sleep waits for GNU and Intel OpenMP (the user's own values win); returns what is in
    effect."""
    for name, value in WAIT_POLICY.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in WAIT_POLICY}
