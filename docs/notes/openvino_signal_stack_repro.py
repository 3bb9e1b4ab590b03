"""Minimal reproduction of the silent exit 139 (OpenVINO 2026.4.1, CPython 3.11, Linux x86-64); no project code.

    python docs/notes/openvino_signal_stack_repro.py fifo   # killed by SIGSEGV, no traceback (exit 139)
    python docs/notes/openvino_signal_stack_repro.py lifo   # prints "survived lifo"
    python docs/notes/openvino_signal_stack_repro.py shared # one Core for both models: "survived shared"

Each ov.Core builds its own CPU plugin; the plugin's constructor mmaps a signal stack and installs it on the
calling thread (saving the previous one), its destructor puts the saved one back only if its own is still
current, then unmaps its own. Released in creation order: A is not current -> A unmapped; B is current -> the
saved A is put back, unmapped. Python runs signal handlers on that stack (SA_ONSTACK), so the next handled
signal cannot be delivered and the kernel kills the process with SIGSEGV (si_code SI_KERNEL); faulthandler's
own handler needs the same stack, so nothing is printed. See openvino_signal_stack.md.
"""

import faulthandler
import signal
import subprocess
import sys

import numpy as np
import openvino as ov
from openvino import opset13 as ops

faulthandler.enable()  # as pytest does: CPython's signal stack is the one plugin A saves
param = ops.parameter([1, 4], np.float32)
model = ov.Model([ops.relu(param)], [param])
order = sys.argv[1] if len(sys.argv) > 1 else "fifo"

core_a = ov.Core()
compiled_a = core_a.compile_model(model, "CPU")  # plugin A: its stack installed, CPython's saved
core_b = core_a if order == "shared" else ov.Core()
compiled_b = core_b.compile_model(model, "CPU")  # plugin B (own Core): its stack installed, A's saved
if order == "lifo":
    del compiled_b, core_b
    del compiled_a, core_a
else:
    del compiled_a, core_a  # fifo: A is not current -> only unmapped
    del compiled_b, core_b  # fifo: B is current -> A's (unmapped) stack put back
signal.signal(signal.SIGCHLD, lambda *_: None)  # any Python handler; torch's DataLoader installs this one
subprocess.run(["true"], check=True)  # the child's exit: SIGCHLD, handled on the main thread's signal stack
print("survived", order)
