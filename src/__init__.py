"""D-FINE pipeline. Importing any stage (`python -m src.<pkg>.<stage>`) switches off phone-home first."""

from src.common.offline import set_offline_env

set_offline_env()
