"""Precision and threads chosen by the hardware (src/common/hardware.py), and bf16 training staying close to
fp32 on tiny data."""

from __future__ import annotations

import pytest
import torch
from loguru import logger

from src.common.errors import ConfigError
from src.common.hardware import (
    _cgroup_headroom,
    apply_channels_last,
    choose_precision,
    cpu_flags,
    cpu_native_bf16,
    ram_available_bytes,
    resolve_threads,
)

CPU = torch.device("cpu")
ZEN4 = {"fpu", "avx512f", "avx512_bf16"}  # this project's build machine
SAPPHIRE_RAPIDS = {"fpu", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
OLD_CPU = {"fpu", "avx2"}


@pytest.fixture
def warnings_logged():
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(sink)


def test_cpuinfo_flags_are_read(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n\nflags\t: other\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == set()
    assert cpu_native_bf16(SAPPHIRE_RAPIDS) == "amx_bf16"
    assert cpu_native_bf16(ZEN4) == "avx512_bf16"
    assert cpu_native_bf16(OLD_CPU) is None


def test_auto_picks_bf16_and_channels_last_only_on_native_bf16_cpus(warnings_logged):
    native = choose_precision("auto", CPU, ZEN4)
    assert (native.dtype, native.channels_last, native.grad_scaler) == (torch.bfloat16, True, False)
    assert "avx512_bf16" in native.describe() and native.describe().startswith(
        "precision bf16 + channels_last"
    )
    emulated = choose_precision("auto", CPU, OLD_CPU)
    assert (emulated.dtype, emulated.channels_last) == (None, False)
    assert "no native bf16" in emulated.reason
    assert choose_precision("off", CPU, ZEN4).dtype is None
    assert choose_precision(False, CPU, ZEN4).dtype is None  # YAML reads a bare `off` as false
    assert not warnings_logged


def test_bf16_asked_without_native_support_warns_and_runs(warnings_logged):
    precision = choose_precision("bf16", CPU, OLD_CPU)
    assert precision.dtype is torch.bfloat16 and not precision.channels_last
    assert len(warnings_logged) == 1 and "emulated and slower" in warnings_logged[0]
    assert choose_precision("bf16", CPU, ZEN4).channels_last


def test_bad_amp_values_are_refused():
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        choose_precision("fp16", CPU, ZEN4)
    with pytest.raises(ConfigError, match="train.amp"):
        choose_precision("half", CPU, ZEN4)


def test_threads_default_follows_the_cpus_and_the_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # idle 2-core machine: both cores for the step (the workers need a fraction of one)
    assert resolve_threads(None, num_workers=2, cpus=2, busy=0.1)[0] == 2
    # the same machine with other jobs running: 1 thread
    assert resolve_threads(None, num_workers=2, cpus=2, busy=1.2)[0] == 1
    assert resolve_threads(None, num_workers=2, cpus=2, busy=9.0)[0] == 1
    # larger machines leave the loader workers their cores; DDP processes share the CPUs
    assert resolve_threads(None, num_workers=2, cpus=16, busy=0.0)[0] == 14
    assert resolve_threads(None, num_workers=2, cpus=16, busy=6.0)[0] == 10
    assert resolve_threads(None, num_workers=2, processes=4, cpus=16, busy=0.0)[0] == 2
    assert resolve_threads(None, num_workers=0, cpus=1, busy=3.0)[0] == 1
    threads, why = resolve_threads(None, num_workers=2, cpus=2, busy=0.1)
    assert "load average 0.1" in why
    assert resolve_threads(3, num_workers=2, cpus=2) == (3, "train.threads")
    with pytest.raises(ConfigError, match="train.threads"):
        resolve_threads(0, num_workers=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(None, num_workers=2)[0] is None  # the user's (or torchrun's) choice stands


def _tiny_training_losses(precision, steps: int = 2) -> list[float]:
    """D-FINE-n at 64 px, 10 queries, batch 2: the real train step (autocast forward, float32 loss, AdamW) `steps` times."""
    from benchmarks.train_speed import synthetic_batch
    from src.dl.train import clip_and_step, compute_loss
    from src.dl.train.optim import build_optimizer
    from src.models import build_criterion, build_model

    torch.manual_seed(0)
    model = apply_channels_last(build_model("n", 4, img_size=(64, 64), num_queries=10).train(), precision)
    criterion = build_criterion("n", 4).train()
    optimizer = build_optimizer(model, base_lr=8e-4, backbone_lr=4e-4, weight_decay=1.25e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    images, targets = synthetic_batch(2, 64, CPU)
    losses = []
    for _ in range(steps):
        torch.manual_seed(1)  # the same denoising queries in both precisions
        loss, _ = compute_loss(model, criterion, images, targets, precision.dtype)
        loss.backward()
        clip_and_step(model, optimizer, scaler, clip_max_norm=0.1)
        losses.append(float(loss.detach()))
    return losses


def test_bf16_channels_last_losses_stay_close_to_fp32():
    # One thread, whatever an earlier test left: alone at 2 threads on a Xeon with AMX the tiny model's second
    # bf16 step drifted 7% (oneDNN picks other kernels), so the result depended on test order.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = _tiny_training_losses(choose_precision("off", CPU))
        bf16 = _tiny_training_losses(choose_precision("bf16", CPU, ZEN4))  # channels_last too
    finally:
        torch.set_num_threads(before)
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= 0.03 * abs(a), (fp32, bf16)
    assert fp32 != bf16  # bf16 really ran


def test_a_container_memory_limit_caps_the_available_memory(tmp_path):
    (tmp_path / "memory.max").write_text("1000\n")
    (tmp_path / "memory.current").write_text("300\n")
    assert _cgroup_headroom(tmp_path) == 700
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_headroom(tmp_path) is None
    assert _cgroup_headroom(tmp_path / "missing") is None
    assert ram_available_bytes() is None or ram_available_bytes() > 0


def test_torch_inference_threads_are_lowered_on_a_loaded_machine(monkeypatch):
    from src.common import hardware
    from src.runtime import torch_model

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(hardware, "busy_cpus", lambda: 0.2)
        torch_model.limit_threads_to_free_cpus()
        assert torch.get_num_threads() == 2  # idle: kept
        monkeypatch.setattr(hardware, "busy_cpus", lambda: 7.5)
        torch_model.limit_threads_to_free_cpus()
        assert torch.get_num_threads() == 1  # other jobs hold the cores
        monkeypatch.setattr(hardware, "busy_cpus", lambda: 0.0)
        torch_model.limit_threads_to_free_cpus()
        assert torch.get_num_threads() == 1  # never raised again
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- threads under load


def test_openmp_waits_briefly_then_sleeps_and_the_user_value_wins(monkeypatch):
    import os
    import subprocess
    import sys

    from src.common.config import ROOT
    from src.common.threads import WAIT_POLICY, set_openmp_wait_policy

    for name in WAIT_POLICY:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KMP_BLOCKTIME", "5")
    assert set_openmp_wait_policy() == {"GOMP_SPINCOUNT": WAIT_POLICY["GOMP_SPINCOUNT"], "KMP_BLOCKTIME": "5"}
    # every entry point (`python -m src...`) has it before anything imports torch
    code = "import sys, os, src; print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in WAIT_POLICY}
    shown = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert shown.stdout.split() == [WAIT_POLICY["GOMP_SPINCOUNT"], "False"], shown.stderr


def test_threads_are_re_decided_from_measured_throughput(warnings_logged):
    from src.dl.train.speed import ThreadTuner, thread_ladder

    assert thread_ladder(2) == [1, 2] and thread_ladder(14) == [1, 3, 7, 14]
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="INFO")
    set_to: list[int] = []
    tuner = ThreadTuner(start=2, most=2, set_threads=set_to.append)
    loaded = {1: 4.0, 2: 2.0}  # another job holds a core: 2 threads wait on it
    idle = {1: 4.0, 2: 5.0}
    try:
        counts = []
        for epoch in range(15):
            rates = loaded if epoch < 10 else idle  # a fake throughput source: img/s per thread count
            tuner.after_epoch(epoch, rates[tuner.current])
            counts.append(tuner.current)
    finally:
        logger.remove(sink)
    # epoch 0 warms up; 1 measures 2 threads; 2 tries 1 thread, faster: kept; 5 checks 2 again, slower: back;
    # the load goes away at 10; 13 checks 2 again (less often now), faster: kept
    assert counts == [2, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 2]
    assert set_to == [1, 2, 1, 2]
    logged = [m.split(" - ", 1)[1].strip() for m in messages if "torch threads" in m]
    assert logged == [
        "torch threads 2 -> 1: measuring it for one epoch (2 thread(s): 2.00 img/s)",
        "torch threads 1 kept: 4.00 img/s against 2.00 at 2 thread(s)",
        "torch threads 1 -> 2: measuring it for one epoch (1 thread(s): 4.00 img/s)",
        "torch threads 2 -> 1: 4.00 img/s against 2.00 at 2 thread(s)",
        "torch threads 1 -> 2: measuring it for one epoch (1 thread(s): 4.00 img/s)",
        "torch threads 2 kept: 5.00 img/s against 4.00 at 1 thread(s)",
    ]
    # a count never set by hand only: the automatic choice is the one re-decided
    start, tuner = setup_speed_tuner(threads=3)
    assert tuner is None and start == 3


def setup_speed_tuner(threads):
    from src.dl.train.speed import setup_speed

    before = torch.get_num_threads()
    try:
        _, tuner = setup_speed(threads, 0, "off", CPU)
        return torch.get_num_threads(), tuner
    finally:
        torch.set_num_threads(before)
