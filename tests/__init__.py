"""The test suite. OpenMP's wait policy is set here, before any test module or plugin imports torch, as every
entry point of the project sets it (src/common/threads.py)."""

from src.common.threads import set_openmp_wait_policy

set_openmp_wait_policy()
