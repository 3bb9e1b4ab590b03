"""Near-duplicate detection on planted copies among unrelated images of one kind, and the doctor's speed.

    python -m benchmarks.near_duplicates                       # recall, false pairs and groups, seed 2026
    python -m benchmarks.near_duplicates --seed 7 --per-kind 400 --copies 400
    python -m benchmarks.near_duplicates --doctor 2000         # + the doctor over 2000 images (time, peak RSS)

The images (tests/helpers/near_duplicate_data.py): --per-kind images of each kind — demo scenes with shapes
(480x640), the same without shapes (textured background + clutter), smooth two-colour gradients under weak
blotches (little structure: unrelated ones share their coarse picture and pHash), labelled images of the demo
data's sizes (256-512 a side) — and --copies planted copies of images of any kind: resized to 50-200%, JPEG
quality 40-90, cropped up to 10% of each side's length, brightness +-20%, mirrored half of the time.
Reported: recall of the planted pairs, false pairs (unrelated images paired; by kind), the doctor's groups
(near_duplicate_groups, as split uses them): planted pairs found whole, groups holding unrelated images.
Targets: recall >= 0.95, no false pair, no group with unrelated images; the doctor over 10,000 images in
<= 60 s on 2 cores. The thresholds were chosen on seeds 0-2; the default seed 2026 was not looked at then.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from tests.helpers.near_duplicate_data import KINDS, planted_copy, scene


def planted_set(seed: int, per_kind: int, copies: int) -> tuple[list, list[str], dict[int, int]]:
    """Fingerprints of per_kind images of every kind + copies of some of them: (prints, kinds, copy -> original).
    Images are fingerprinted as they are made (a few KB kept each, not the pixels)."""
    from src.etl.near_duplicates import fingerprint

    rng = np.random.default_rng([seed, 1_000_003])
    total = per_kind * len(KINDS)
    to_copy = set(rng.choice(total, copies, replace=False).tolist())
    prints, kinds, copies_of, copy_prints = [], [], [], []
    for index in range(total):
        kind = KINDS[index // per_kind]
        image = scene(index % per_kind, seed, kind=kind)
        prints.append(fingerprint(image))
        kinds.append(kind)
        if index in to_copy:
            copy_prints.append(fingerprint(planted_copy(image, rng)))
            copies_of.append(index)
    original_of = {total + k: i for k, i in enumerate(copies_of)}
    return prints + copy_prints, kinds + [f"copy of {kinds[i]}" for i in copies_of], original_of


def near_duplicate_quality(seed: int, per_kind: int, copies: int, settings) -> dict:
    from src.etl.near_duplicates import near_duplicate_groups, near_duplicate_pairs

    prints, kinds, original_of = planted_set(seed, per_kind, copies)
    truth = {(original, copy) for copy, original in original_of.items()}
    start = time.perf_counter()
    found = {(i, j) for i, j, _ in near_duplicate_pairs(prints, settings)}
    pairs_seconds = time.perf_counter() - start
    start = time.perf_counter()
    groups = near_duplicate_groups(list(range(len(prints))), prints, settings)
    groups_seconds = time.perf_counter() - start
    false = found - truth
    family = {i: original_of.get(i, i) for i in range(len(prints))}  # an image and its copy: one family
    mixed = [g for g in groups if len({family[i] for i in g}) > 1]
    whole = sum(any({o, c} <= set(g) for g in groups) for o, c in truth)
    return {
        "seed": seed,
        "images": len(prints),
        "planted_pairs": len(truth),
        "settings": vars(settings),
        "recall": round(len(found & truth) / len(truth), 4),
        "false_pairs": len(false),
        "false_pairs_by_kind": dict(Counter(" + ".join(sorted((kinds[i], kinds[j]))) for i, j in false)),
        "unrelated_pairs": len(prints) * (len(prints) - 1) // 2 - len(truth),
        "groups": len(groups),
        "planted_pairs_grouped_whole": whole,
        "groups_with_unrelated_images": len(mixed),
        "largest_group": max((len(g) for g in groups), default=0),
        "all_pairs_verified_s": round(pairs_seconds, 2),
        "grouping_s": round(groups_seconds, 2),
    }


def doctor_speed(count: int, workers: int = 2) -> dict:
    """Time the doctor (full decode, content hash, pHash, labels, groups, sizes) over `count` 640x480 JPGs."""
    from src.common.config import default_config
    from src.etl.data_quality import box_size_table
    from src.etl.doctor import NearDuplicateSettings, diagnose

    check = default_config().check
    settings = NearDuplicateSettings(
        int(check.near_duplicate_distance),
        float(check.near_duplicate_similarity),
        float(check.near_duplicate_detail),
    )
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = Path(tmp) / "images", Path(tmp) / "labels"
        images.mkdir()
        labels.mkdir()
        base = [scene(i) for i in range(50)]
        rng = np.random.default_rng(1)
        for i in range(count):  # distinct files: a base scene shifted by noise, so no two decode alike
            noisy = np.clip(base[i % 50].astype(np.int16) + rng.integers(-3, 4, (1, 1, 3)), 0, 255).astype(
                np.uint8
            )
            cv2.imwrite(str(images / f"img_{i:05d}.jpg"), noisy[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            (labels / f"img_{i:05d}.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.05 0.05\n")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start, cpu_start = time.perf_counter(), time.process_time()
        report = diagnose(Path(tmp), ["a", "b"], workers=workers, near_duplicates=settings)
        box_size_table(report, (640, 640), keep_ratio=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "images": count,
        "seconds": round(seconds, 1),
        "images_per_s": round(count / seconds, 1),
        "extrapolated_10k_s": round(seconds * 10_000 / count, 1),
        # CPU seconds of all threads: on a machine shared with other jobs, cpu / 2 estimates 2 idle cores
        "cpu_s": round(cpu_seconds, 1),
        "extrapolated_10k_cpu_s_per_2_cores": round(cpu_seconds / 2 * 10_000 / count, 1),
        "peak_rss_growth_mb": round((rss_after - rss_before) / 1024, 1),
        "near_duplicate_groups": len(report.near_duplicate_groups),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-kind", type=int, default=200, help=f"unrelated images of each of {KINDS}")
    parser.add_argument("--copies", type=int, default=200)
    parser.add_argument(
        "--seed", type=int, default=2026, help="images and copies (thresholds chosen on seeds 0-2)"
    )
    parser.add_argument("--distance", type=int, default=None, help="default: check.near_duplicate_distance")
    parser.add_argument(
        "--similarity", type=float, default=None, help="default: check.near_duplicate_similarity"
    )
    parser.add_argument("--detail", type=float, default=None, help="default: check.near_duplicate_detail")
    parser.add_argument("--doctor", type=int, default=0, help="also time the doctor over this many images")
    args = parser.parse_args(argv)
    from src.common.config import default_config
    from src.etl.near_duplicates import NearDuplicateSettings

    check = default_config().check
    settings = NearDuplicateSettings(
        args.distance if args.distance is not None else int(check.near_duplicate_distance),
        args.similarity if args.similarity is not None else float(check.near_duplicate_similarity),
        args.detail if args.detail is not None else float(check.near_duplicate_detail),
    )
    if args.per_kind:
        print(near_duplicate_quality(args.seed, args.per_kind, args.copies, settings), flush=True)
    if args.doctor:
        print(doctor_speed(args.doctor), flush=True)


if __name__ == "__main__":
    main()
