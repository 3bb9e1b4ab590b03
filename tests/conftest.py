"""Suite-wide guard: a test that leaves the main thread's signal stack dangling fails by name.

Without it, the damage shows only later, as a silent exit 139 of the whole pytest process in whichever test
first receives a handled signal (see tests/signal_stack.py).
"""

from __future__ import annotations

import pytest

from tests.signal_stack import SUPPORTED, dangling_signal_stack, disable_signal_stack


@pytest.fixture(autouse=True)
def main_thread_signal_stack_stays_mapped(request):
    yield
    if not SUPPORTED:
        return
    address = dangling_signal_stack()
    if address is not None:
        disable_signal_stack()  # the rest of the session goes on instead of dying at the next signal
        pytest.fail(
            f"{request.node.nodeid} left the main thread's alternate signal stack on unmapped memory "
            f"(0x{address:x}); the next handled signal would kill pytest (docs/notes/openvino_signal_stack.md)"
        )


@pytest.fixture()
def caplog_loguru():
    """Loguru's messages collected as text (pytest's caplog does not see loguru)."""
    from loguru import logger

    class Sink:
        text = ""

        def write(self, message):
            Sink.text += message

    sink_id = logger.add(Sink(), level="WARNING", format="{message}")
    yield Sink
    logger.remove(sink_id)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module of tiny models: a second thread gains nothing on tiny tensors,
    and on a busy 2-core machine OpenMP threads waiting on each other made a step ~50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
