"""Benchmarks (`python -m benchmarks.<name>`). OpenMP's wait policy is set here as for every stage: a
benchmark module imports torch before src, and the runtime reads it when torch loads."""

from src.common.threads import set_openmp_wait_policy

set_openmp_wait_policy()
