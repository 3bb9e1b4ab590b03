"""The calling thread's alternate signal stack (sigaltstack(2)), read through libc; Linux only.

Python's signal handlers and faulthandler run on this stack (SA_ONSTACK). When it points at unmapped memory the
kernel cannot deliver the next handled signal and kills the process with SIGSEGV, no traceback (exit 139):
how OpenVINO CPU plugins released in creation order crashed pytest (docs/notes/openvino_signal_stack.md).
"""

from __future__ import annotations

import ctypes
import sys

SS_DISABLE = 2  # <bits/ss_flags.h>
SUPPORTED = sys.platform.startswith("linux")


class StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _sigaltstack(new: StackT | None) -> StackT:
    libc = ctypes.CDLL(None, use_errno=True)
    old = StackT()
    if libc.sigaltstack(ctypes.byref(new) if new is not None else None, ctypes.byref(old)) != 0:
        raise OSError(ctypes.get_errno(), "sigaltstack failed")
    return old


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(part, 16) for part in line.split(None, 1)[0].split("-"))
            if low <= address < high:
                return True
    return False


def dangling_signal_stack() -> int | None:
    """This thread's alternate signal stack address when any end of it is unmapped, else None."""
    stack = _sigaltstack(None)
    if stack.ss_flags & SS_DISABLE or not stack.ss_sp:
        return None
    ends = (stack.ss_sp, stack.ss_sp + stack.ss_size - 1)  # the kernel writes the frame at the top end
    return None if all(_mapped(end) for end in ends) else stack.ss_sp


def disable_signal_stack() -> None:
    """Handlers of this thread run on its normal stack from now on (what a dangling stack is replaced with)."""
    _sigaltstack(StackT(None, SS_DISABLE, 0))
