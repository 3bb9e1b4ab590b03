"""The family timing table: each family's official training step next to ours, one family per process.

    official-venv/bin/python tools/parity/family_timing.py --deim /path/to/DEIM --detr /path/to/detr \
        --out /tmp/family_timing [--threads 1] [--repeats 5]

Runs tools/parity/rtdetrv2/time_step.py (D-FINE-n, DEIM-D-FINE-n, RT-DETRv2-r18, DEIM-RT-DETRv2-r18) and
tools/parity/detr/time_step.py (DETR-R50), each in a fresh process (the official config loader keeps the
keys of earlier files), writes each report as <out>/<arch>.json and prints a markdown table of the median
process-CPU seconds per step (user + sys), ours / official, and the load averages seen.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEIM_ARCHS = {
    "dfine": "D-FINE-n",
    "deim_dfine": "DEIM-D-FINE-n",
    "rtdetrv2": "RT-DETRv2-r18",
    "deim_rtdetrv2": "DEIM-RT-DETRv2-r18",
}
PRECISIONS = ("fp32", "bf16")


def run_deim(arch: str, args, out: Path) -> dict:
    command = [
        sys.executable,
        str(HERE / "rtdetrv2" / "time_step.py"),
        "--official",
        str(args.deim),
        "--arch",
        arch,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--json",
        str(out),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    return {p: report[p]["median_cpu_s"] for p in PRECISIONS} | {"load": report["loadavg_before"][0]}


def run_detr(args, out: Path) -> dict:
    command = [
        sys.executable,
        str(HERE / "detr" / "time_step.py"),
        "--official",
        str(args.detr),
        "--threads",
        str(args.threads),
        "--reps",
        str(args.repeats),
        "--json",
        str(out),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    cpu = report["median_cpu_s"]
    medians = {p: {"official": cpu[f"official_{p}"], "ours": cpu[f"ours_{p}"]} for p in PRECISIONS}
    return medians | {"load": report["loadavg_before"][0]}


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| model | fp32 official (s) | fp32 ours (s) | ours/official | bf16 official (s) | bf16 ours (s) "
        "| ours/official | load avg (1 min, at start) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        cells = []
        for p in PRECISIONS:
            official, ours = row[p]["official"], row[p]["ours"]
            cells += [f"{official:.2f}", f"{ours:.2f}", f"{ours / official:.3f}"]
        lines.append(f"| {name} | {' | '.join(cells)} | {row['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deim", type=Path, required=True, help="checkout of Intellindust-AI-Lab/DEIM")
    parser.add_argument("--detr", type=Path, required=True, help="checkout of facebookresearch/detr")
    parser.add_argument("--out", type=Path, required=True, help="folder for the per-family JSON reports")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arch", action="append", choices=[*DEIM_ARCHS, "detr"], help="default: all five")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for arch in args.arch or [*DEIM_ARCHS, "detr"]:
        out = args.out / f"{arch}.json"
        rows[DEIM_ARCHS.get(arch, "DETR-R50")] = (
            run_detr(args, out) if arch == "detr" else run_deim(arch, args, out)
        )
        print(f"{arch} done", file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
