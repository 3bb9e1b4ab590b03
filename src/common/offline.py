"""Switch off every library's phone-home before it is imported (no internet here, and users expect quiet)."""

import os
from pathlib import Path


def _opt_out_openvino_telemetry() -> None:
    # openvino_telemetry reads ~/intel/openvino_telemetry: "0" is its documented opt-out
    # (what `opt_in_out --opt_out` writes). Only create it; never override a user's own choice.
    try:
        consent = Path.home() / "intel" / "openvino_telemetry"
        if not consent.exists():
            consent.parent.mkdir(parents=True, exist_ok=True)
            consent.write_text("0")
    except OSError:
        pass  # read-only home: telemetry then finds no consent and sends nothing either


def set_offline_env() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")  # the trainer switches to offline/online when enabled
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's own switch that replaces its telemetry with a stub
    os.environ.setdefault("DO_NOT_TRACK", "1")
    _opt_out_openvino_telemetry()
