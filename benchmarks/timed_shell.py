#!/usr/bin/env python3
"""make's SHELL for benchmarks/demo_time.py: runs each recipe line with bash and appends one JSON line per
line to $DEMO_TIME_LOG: the command, wall seconds, CPU seconds (user + system of everything it ran) and
the 1-minute load average before and after. Standard library only (it runs outside the venv)."""

import json
import os
import resource
import subprocess
import sys
import time

load_before = os.getloadavg()[0]
started = time.perf_counter()
code = subprocess.run(["/bin/bash", *sys.argv[1:]]).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
record = {
    "command": sys.argv[-1],
    "wall_s": round(time.perf_counter() - started, 2),
    "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    "load_before": load_before,
    "load_after": os.getloadavg()[0],
    "exit": code,
}
log = os.environ.get("DEMO_TIME_LOG")
if log:
    with open(log, "a") as out:
        out.write(json.dumps(record) + "\n")
sys.exit(code)
