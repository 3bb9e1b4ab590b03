"""Tracking alone, on a synthetic video of moving, crossing shapes with known trajectories.

    python -m benchmarks.tracking [--frames 300] [--objects 8] [--max-speed 5] [--seeds 0 1 2] [--video out.mp4]

The shapes are drawn with OpenCV (z-ordered: later objects cover earlier ones) and bounce off the borders,
so they cross often. The detections come from the known boxes, as a detector would give them: edges
jittered, a partly covered object scored low (ByteTrack's second pass must keep it), a mostly covered
one missed, random misses, random false positives, and 10% of the detections with a wrong class (the
track's majority vote must fix it). The tracker (src.runtime.tracking) is measured alone: IDF1 and
identity switches scored with TrackEval (the MOTChallenge evaluation code) against the ground truth of
every object at least MIN_VISIBLE visible, and the time of `Tracker.update` per frame.
Targets: IDF1 >= 0.9, <= 2 identity switches per 100 frames, <= 2 ms per frame, on the
default scene (8 objects, up to 5 px/frame); the stress rows (16 objects, up to 10 px/frame) show where
the tracker starts to fail.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from src.runtime.detector import Detections
from src.runtime.tracking import Tracker, TrackerSettings, iou_pairs

CLASS_NAMES = ["circle", "square", "triangle", "star"]
COLORS_BGR = [(60, 60, 230), (230, 120, 40), (40, 200, 60), (40, 200, 230)]
MIN_VISIBLE = 0.3  # an object less visible than this is missed by the detector and not in the ground truth
LOW_VISIBLE = 0.7  # an object less visible than this is detected with a low score
# Tracker settings of the benchmark: config.yaml's infer.tracker defaults (kept equal by a test).
SETTINGS = TrackerSettings(
    low_conf=0.1, match_iou=0.2, low_match_iou=0.5, confirm_frames=2, max_lost_frames=30
)


@dataclass
class Scene:
    """Ground truth of a synthetic video: per frame, the objects at least MIN_VISIBLE visible."""

    width: int
    height: int
    ids: list[np.ndarray]  # per frame (G,) object ids
    boxes: list[np.ndarray]  # per frame (G, 4) xyxy
    labels: list[np.ndarray]  # per frame (G,) class ids
    visible: list[np.ndarray]  # per frame (G,) visible fraction of each object
    frames: list[np.ndarray] | None  # BGR frames when rendered with keep_frames

    def __len__(self) -> int:
        return len(self.ids)


def draw_shape(canvas: np.ndarray, label: int, box: np.ndarray, color) -> None:
    """A filled circle / square / triangle / star inscribed in the xyxy box."""
    x1, y1, x2, y2 = box
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if label == 0:
        cv2.ellipse(canvas, (round(cx), round(cy)), (round(rx), round(ry)), 0, 0, 360, color, -1)
    elif label == 1:
        cv2.rectangle(canvas, (round(x1), round(y1)), (round(x2), round(y2)), color, -1)
    else:
        points = 3 if label == 2 else 10
        angles = -np.pi / 2 + np.arange(points) * 2 * np.pi / points
        radius = np.ones(points) if label == 2 else np.where(np.arange(points) % 2, 0.45, 1.0)
        poly = np.stack([cx + rx * radius * np.cos(angles), cy + ry * radius * np.sin(angles)], 1)
        if label == 2:  # stretch the triangle to the box's full height
            poly[:, 1] = np.where(poly[:, 1] < cy, y1, y2)
        cv2.fillPoly(canvas, [np.round(poly).astype(np.int32)], color)


def make_scene(
    frames: int = 300,
    objects: int = 8,
    seed: int = 0,
    size: tuple[int, int] = (640, 480),
    keep_frames: bool = False,
    max_speed: float = 5.0,
) -> Scene:
    """Objects of 40-90 px with constant velocities (1 to max_speed px/frame) bouncing off the borders."""
    rng = np.random.default_rng(seed)
    width, height = size
    sides = rng.uniform(40, 90, (objects, 2))  # (O, 2) w, h
    position = rng.uniform([0, 0], [width - 90, height - 90], (objects, 2))  # top-left
    speed = rng.uniform(1, max_speed, objects)[:, None] * _unit_vectors(rng, objects)  # (O, 2) px/frame
    labels = np.arange(objects) % len(CLASS_NAMES)
    scene = Scene(width, height, [], [], [], [], [] if keep_frames else None)
    for _ in range(frames):
        boxes = np.concatenate([position, position + sides], 1)  # (O, 4)
        canvas = np.full((height, width, 3), 30, np.uint8)
        owner = np.full((height, width), -1, np.int32)  # which object is on top at each pixel
        areas = np.zeros(objects)
        for index in range(objects):
            mask = np.zeros((height, width), np.uint8)
            draw_shape(mask, int(labels[index]), boxes[index], 1)
            areas[index] = mask.sum()
            owner[mask > 0] = index
            draw_shape(canvas, int(labels[index]), boxes[index], COLORS_BGR[labels[index]])
        visible = np.bincount(owner[owner >= 0], minlength=objects) / np.maximum(areas, 1)
        keep = visible >= MIN_VISIBLE
        scene.ids.append(np.flatnonzero(keep))
        scene.boxes.append(boxes[keep])
        scene.labels.append(labels[keep])
        scene.visible.append(visible[keep])
        if keep_frames:
            scene.frames.append(canvas)
        position, speed = _bounce(position + speed, speed, sides, width, height)
    return scene


def _unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, count)
    return np.stack([np.cos(angle), np.sin(angle)], 1)


def _bounce(position, speed, sides, width, height):
    limit = np.array([width, height]) - sides
    out = (position < 0) | (position > limit)
    speed = np.where(out, -speed, speed)
    return np.clip(position, 0, limit), speed


def detections_of(scene: Scene, frame: int, rng: np.random.Generator, miss=0.05, flip=0.1, fps=0.3):
    """What a detector would report for one frame of the scene (see the module doc)."""
    boxes, labels, visible = scene.boxes[frame], scene.labels[frame], scene.visible[frame]
    detected = rng.random(len(boxes)) >= miss
    sides = np.repeat(boxes[:, 2:] - boxes[:, :2], 2, axis=0).reshape(-1, 4)
    noisy = boxes + rng.normal(0, 0.03, boxes.shape) * sides
    scores = np.where(
        visible >= LOW_VISIBLE, rng.uniform(0.55, 0.95, len(boxes)), rng.uniform(0.15, 0.45, len(boxes))
    )
    flipped = rng.random(len(boxes)) < flip
    labels = np.where(
        flipped, (labels + rng.integers(1, len(CLASS_NAMES), len(labels))) % len(CLASS_NAMES), labels
    )
    false_boxes = _random_boxes(rng, rng.poisson(fps), scene.width, scene.height)
    boxes = np.concatenate([noisy[detected], false_boxes])
    scores = np.concatenate([scores[detected], rng.uniform(0.3, 0.7, len(false_boxes))])
    labels = np.concatenate([labels[detected], rng.integers(0, len(CLASS_NAMES), len(false_boxes))])
    order = np.argsort(-scores)
    return Detections(
        boxes[order].astype(np.float32),
        scores[order].astype(np.float32),
        labels[order].astype(np.int64),
        [CLASS_NAMES[i] for i in labels[order]],
        (scene.height, scene.width),
    )


def _random_boxes(rng: np.random.Generator, count: int, width: int, height: int) -> np.ndarray:
    sides = rng.uniform(30, 80, (count, 2))
    corner = rng.uniform(0, 1, (count, 2)) * (np.array([width, height]) - sides)
    return np.concatenate([corner, corner + sides], 1).reshape(-1, 4)


@dataclass
class TrackedFrame:
    ids: np.ndarray  # (K,) track ids (>= 1) of the tracked detections
    boxes: np.ndarray  # (K, 4) xyxy
    labels: np.ndarray  # (K,) majority-vote class of each track
    det_labels: np.ndarray  # (K,) the detector's class of each of these detections


def run_tracker(scene: Scene, seed: int = 0) -> tuple[list[TrackedFrame], np.ndarray]:
    """The tracker over the scene's detections -> tracked frames and the time of each update in ms,
    (frames, 2): wall clock, and CPU time of this thread (on a shared machine the wall clock also counts
    the time other processes held the core: the 4 ms spikes of a scheduler tick)."""
    rng = np.random.default_rng(seed + 1000)
    tracker = Tracker(SETTINGS, np.full(len(CLASS_NAMES), 0.5, np.float32))
    results, times = [], []
    for frame in range(len(scene)):
        dets = detections_of(scene, frame, rng)
        start, start_cpu = time.perf_counter(), time.thread_time()
        ids = tracker.update(dets)
        times.append(((time.perf_counter() - start) * 1000, (time.thread_time() - start_cpu) * 1000))
        keep = ids >= 0
        voted = tracker.voted_labels(ids[keep])
        results.append(TrackedFrame(ids[keep], dets.boxes[keep], voted, dets.labels[keep]))
    return results, np.array(times)


def trackeval_data(scene: Scene, tracked: list[TrackedFrame]) -> dict:
    """TrackEval's per-sequence input: ids remapped to 0..n-1, IoU as the similarity."""
    gt_map = {g: i for i, g in enumerate(sorted({int(g) for ids in scene.ids for g in ids}))}
    tr_map = {t: i for i, t in enumerate(sorted({int(t) for f in tracked for t in f.ids}))}
    return {
        "num_timesteps": len(scene),
        "num_gt_ids": len(gt_map),
        "num_tracker_ids": len(tr_map),
        "num_gt_dets": sum(len(ids) for ids in scene.ids),
        "num_tracker_dets": sum(len(f.ids) for f in tracked),
        "gt_ids": [np.array([gt_map[int(g)] for g in ids], int) for ids in scene.ids],
        "tracker_ids": [np.array([tr_map[int(t)] for t in f.ids], int) for f in tracked],
        "similarity_scores": [iou_pairs(b, f.boxes) for b, f in zip(scene.boxes, tracked, strict=True)],
    }


def score(scene: Scene, tracked: list[TrackedFrame]) -> dict[str, float]:
    """IDF1, identity switches (per 100 frames too), MOTA: TrackEval's Identity and CLEAR at IoU 0.5."""
    from trackeval.metrics import CLEAR, Identity

    data = trackeval_data(scene, tracked)
    config = {"THRESHOLD": 0.5, "PRINT_CONFIG": False}
    identity = Identity(config).eval_sequence(data)
    clear = CLEAR(config).eval_sequence(data)
    return {
        "IDF1": float(identity["IDF1"]),
        "IDSW": int(clear["IDSW"]),
        "IDSW_per_100": 100.0 * int(clear["IDSW"]) / len(scene),
        "MOTA": float(clear["MOTA"]),
        "gt_tracks": data["num_gt_ids"],
        "tracks": data["num_tracker_ids"],
    }


def class_accuracy(scene: Scene, tracked: list[TrackedFrame]) -> tuple[float, float]:
    """(detection classes right, voted classes right): fraction of tracked detections whose class matches
    the ground truth object they overlap most (IoU >= 0.5)."""
    raw = voted = total = 0
    for gt_boxes, gt_labels, frame in zip(scene.boxes, scene.labels, tracked, strict=True):
        iou = iou_pairs(frame.boxes, gt_boxes)
        if iou.size == 0:
            continue
        best = iou.argmax(1)
        hit = iou.max(1) >= 0.5
        raw += int((frame.det_labels[hit] == gt_labels[best[hit]]).sum())
        voted += int((frame.labels[hit] == gt_labels[best[hit]]).sum())
        total += int(hit.sum())
    return raw / max(total, 1), voted / max(total, 1)


def write_video(scene: Scene, tracked: list[TrackedFrame], path: Path, fps: float = 30.0) -> Path:
    """The synthetic video with the track ids drawn (to look at the tracker's behaviour)."""
    from src.common.draw import draw_tracks

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (scene.width, scene.height))
    for frame_bgr, frame in zip(scene.frames, tracked, strict=True):
        rgb = draw_tracks(frame_bgr[..., ::-1], frame.boxes, frame.ids, frame.labels, None, CLASS_NAMES)
        writer.write(np.ascontiguousarray(rgb[..., ::-1]))
    writer.release()
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--objects", type=int, default=8)
    parser.add_argument("--max-speed", type=float, default=5.0, help="px per frame")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-stress", action="store_true", help="skip the 16 objects at <= 10 px/frame rows")
    parser.add_argument("--video", type=Path, default=None, help="write the first seed's tracked video here")
    args = parser.parse_args(argv)
    scenarios = [(args.objects, args.max_speed)] + ([] if args.no_stress else [(16, 10.0)])
    print("| objects | px/frame | seed | frames | crossings | IDF1 | ID switches | per 100 frames | MOTA "
          "| class right: detection → track vote | ms/frame: wall median | CPU mean | CPU p95 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for objects, max_speed in scenarios:
        for seed in args.seeds:
            keep_frames = args.video is not None and (objects, max_speed, seed) == (
                *scenarios[0],
                args.seeds[0],
            )
            scene = make_scene(args.frames, objects, seed, keep_frames=keep_frames, max_speed=max_speed)
            tracked, times = run_tracker(scene, seed)
            result = score(scene, tracked)
            raw, voted = class_accuracy(scene, tracked)
            print(
                f"| {objects} | <= {max_speed:g} | {seed} | {len(scene)} | {count_crossings(scene)} "
                f"| {result['IDF1']:.3f} | {result['IDSW']} | {result['IDSW_per_100']:.2f} | {result['MOTA']:.3f} "
                f"| {raw:.2f} → {voted:.2f} | {np.median(times[:, 0]):.3f} | {times[:, 1].mean():.3f} "
                f"| {np.percentile(times[:, 1], 95):.3f} |",
                flush=True,
            )
            if keep_frames:
                print(f"tracked video: {write_video(scene, tracked, args.video)}")


def count_crossings(scene: Scene) -> int:
    """Pairs of objects whose boxes start overlapping (an occlusion event), over the whole video."""
    overlapping: set[tuple[int, int]] = set()
    events = 0
    for ids, boxes in zip(scene.ids, scene.boxes, strict=True):
        iou = iou_pairs(boxes, boxes)
        now = {(int(ids[a]), int(ids[b])) for a, b in zip(*np.nonzero(np.triu(iou, 1) > 0), strict=True)}
        events += len(now - overlapping)
        overlapping = now
    return events


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
