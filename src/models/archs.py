"""Which detectors exist: `model.arch` -> the `model.name` sizes it has (the one table), and their names.

Kept free of torch and of the model code, so the config rules and the spec can check a choice cheaply.
A family package (src/models/<family>/) builds the archs listed here; src/models/build.py maps each arch
to its family.
"""

from __future__ import annotations

from src.common.errors import ConfigError

DFINE_SIZES = ("n", "s", "m", "l", "x")
DETR_SIZES = ("r50", "r101", "r50_dc5", "r101_dc5")  # ResNet-50/101, plain or DC5 (dilated last stage)
RTDETR_SIZES = ("r18", "r34", "r50m", "r50", "r101")  # ResNet-vd depth; r50m: R50 with a half-width encoder

ARCH_SIZES: dict[str, tuple[str, ...]] = {
    "dfine": DFINE_SIZES,  # D-FINE (HGNetv2, FDR decoder)
    "deim_dfine": DFINE_SIZES,  # DEIM-D-FINE: D-FINE trained DEIM's way, SiLU decoder
    "detr": DETR_SIZES,  # DETR (ResNet, encoder-decoder transformer, softmax classes + "no object")
    "rtdetrv2": RTDETR_SIZES,  # RT-DETRv2 (ResNet-vd, CSP hybrid encoder, deformable decoder)
    "deim_rtdetrv2": RTDETR_SIZES,  # DEIM-RT-DETRv2: trained DEIM's way, SiLU decoder, trainable norms
}

# model.num_queries: null takes the arch's own query count (the official configs').
DEFAULT_QUERIES = {"detr": 100}
OFFICIAL_QUERIES = 300

ARCH_TITLES = {
    "dfine": "D-FINE",
    "deim_dfine": "DEIM-D-FINE",
    "rtdetrv2": "RT-DETRv2",
    "deim_rtdetrv2": "DEIM-RT-DETRv2",
    "detr": "DETR",
}


def check_arch(arch: str, size: str) -> None:
    """ConfigError naming the valid choices unless `arch` is known and `size` is one of its sizes."""
    if arch not in ARCH_SIZES:
        raise ConfigError(
            f"model.arch={arch!r} is not a known detector; choose one of {' | '.join(ARCH_SIZES)}"
        )
    if size not in ARCH_SIZES[arch]:
        raise ConfigError(
            f"model.name={size!r} is not a size of model.arch={arch}; choose one of {' | '.join(ARCH_SIZES[arch])}"
        )


def default_queries(arch: str) -> int:
    return DEFAULT_QUERIES.get(arch, OFFICIAL_QUERIES)


def display_name(arch: str, size: str) -> str:
    """'D-FINE-N', 'RT-DETRv2-R18', 'DETR-R50-DC5': how logs and reports name a model."""
    return f"{ARCH_TITLES.get(arch, arch)}-{size.upper().replace('_', '-')}"
