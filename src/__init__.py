"""D-FINE pipeline. Importing any stage (`python -m src.<pkg>.<stage>`) switches off phone-home and sets
OpenMP's wait policy first (before torch loads its OpenMP runtime)."""

from src.common.offline import set_offline_env
from src.common.threads import set_openmp_wait_policy

set_offline_env()
set_openmp_wait_policy()
