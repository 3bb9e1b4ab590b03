"""Near-duplicate images: candidates by perceptual hash + a coarse colour thumbnail, each confirmed by an
aligned detail thumbnail, grouped without chaining.

Re-encoded, resized, slightly cropped, brightened or mirrored copies and neighbouring video frames look alike
at low resolution. A pair of images is a candidate when BOTH hold (a mirrored copy counts too: every image is
also fingerprinted mirrored):
- their 64-bit pHashes differ in at most `max_distance` bits (cheap, from the maintained imagehash library);
- the correlation of their coarse band-pass colour thumbnails (central 80%, difference of Gaussians at 32x32,
  kept as 16x16x3) is at least `min_similarity`.
A candidate is a near-duplicate pair when the finer detail agrees too: a 32x32 colour thumbnail of the whole
image, its linear gradient removed and band-passed (sigmas 1 and 6 px), is searched for the other's central
85% over crop scales of 90-100% per side and every shift; the best correlation must reach `min_detail`.
Unrelated images of one kind (smooth gradient backgrounds, one texture generator) can share the coarse
picture, hash and thumbnail alike; their details do not line up (benchmarks/near_duplicates.py).
Groups grow from pairs, most similar first, but two groups join only when every image of one is a candidate
of every image of the other: an image close to one member and unlike the rest stays out (no chains). Frames of
one video, which share their background, still form one group. split keeps every group in one split; the
doctor lists groups inside a split and across splits (leaks) with a contact sheet per group.

Memory: 2 hashes, 2 coarse thumbnails (6 KB) and one detail thumbnail (6 KB) per image. The pHashes of all
pairs are compared in chunks of CHUNK rows; thumbnails only for pairs whose pHashes are close, and details only
for candidates that would join two groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from src.common.draw import put_title, tile_images
from src.common.images import ImageReadError, read_image_rgb
from src.common.network_input import letterbox_or_resize

PRE_SIZE = 128  # thumbnail every feature is computed from: area-averaging a full image down is fast
THUMB = 32  # side of the coarse band-pass thumbnail
STORED = 16  # side of the coarse thumbnail kept per image
CENTRAL = 0.8  # share of each side the coarse thumbnail covers: the borders are what a crop removes
BAND = (2.0, 8.0)  # Gaussian sigmas (thumbnail pixels) of the coarse band pass: no pixel noise, no gradient
DETAIL = 32  # side of the detail thumbnail (the whole image)
DETAIL_BAND = (1.0, 6.0)  # its band pass: strokes, shapes and edges, not the noise JPEG and resizing change
CROP_SCALES = (1.0, 0.95, 0.9)  # share of a side a copy may keep: one side of a pair is searched at each
TEMPLATE = 0.85  # share of each side of one detail thumbnail searched in the other
CHUNK = 256  # rows compared at once: CHUNK x N pHash distances
PAIR_BATCH = 2048  # thumbnail pairs correlated at once (3 x 6 MB)

NO_SPLIT = ""


@dataclass(frozen=True)
class NearDuplicateSettings:
    max_distance: int  # pHash bits
    min_similarity: float  # coarse band-pass thumbnail correlation
    min_detail: float  # aligned detail thumbnail correlation


@dataclass
class Fingerprint:
    """What near-duplicate search keeps of one image (the image itself is not kept)."""

    hashes: tuple[int, int]  # pHash of the image, of the mirrored image (64-bit)
    thumbs: np.ndarray  # (2, STORED * STORED * 3) float32 unit-norm band-pass thumbnails: plain, mirrored
    detail: np.ndarray  # (DETAIL, DETAIL, 3) float16 band-passed detail thumbnail, gradient removed


def fingerprint(rgb: np.ndarray) -> Fingerprint:
    """Fingerprint of an RGB uint8 (H, W, 3) image of any size."""
    small_rgb = cv2.resize(rgb, (PRE_SIZE, PRE_SIZE), interpolation=cv2.INTER_AREA)
    small = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2GRAY)
    mirrored = np.ascontiguousarray(small[:, ::-1])
    mirrored_rgb = np.ascontiguousarray(small_rgb[:, ::-1])
    return Fingerprint(
        (_phash(small), _phash(mirrored)),
        np.stack([_band_pass(small_rgb), _band_pass(mirrored_rgb)]),
        _detail(small_rgb),
    )


def _phash(gray: np.ndarray) -> int:
    import imagehash

    return int(np.packbits(imagehash.phash(Image.fromarray(gray)).hash.reshape(-1)).view(">u8")[0])


def _band_pass(rgb: np.ndarray) -> np.ndarray:
    """(PRE_SIZE, PRE_SIZE, 3) uint8 -> (STORED * STORED * 3,) unit-norm float32."""
    size = rgb.shape[0]
    margin = int(size * (1 - CENTRAL) / 2)
    central = rgb[margin : size - margin, margin : size - margin]
    thumb = cv2.resize(central, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
    thumb = cv2.GaussianBlur(thumb, (0, 0), BAND[0]) - cv2.GaussianBlur(thumb, (0, 0), BAND[1])
    # What is left after the band pass varies slowly: STORED x STORED samples keep it at a quarter of the memory.
    thumb = cv2.resize(thumb, (STORED, STORED), interpolation=cv2.INTER_AREA)
    thumb -= thumb.mean(axis=(0, 1))  # brightness and contrast changes cancel out in the correlation
    return (thumb / (np.linalg.norm(thumb) + 1e-6)).reshape(-1)


def _detail(rgb: np.ndarray) -> np.ndarray:
    """(PRE_SIZE, PRE_SIZE, 3) uint8 -> (DETAIL, DETAIL, 3) float16 band-passed, its linear gradient removed.

    A gradient's band pass is not zero at the borders (the blur reflects the ramp there): left in, it would
    make unrelated images with a similar gradient correlate."""
    thumb = cv2.resize(rgb, (DETAIL, DETAIL), interpolation=cv2.INTER_AREA).astype(np.float32)
    ys, xs = np.mgrid[0:DETAIL, 0:DETAIL].astype(np.float32) / DETAIL
    plane = np.stack([xs.ravel(), ys.ravel(), np.ones(DETAIL * DETAIL, np.float32)], axis=1)  # (D*D, 3)
    flat = thumb.reshape(-1, 3)
    coefficients, *_ = np.linalg.lstsq(plane, flat, rcond=None)  # (3, 3): x, y, 1 per channel
    thumb = (flat - plane @ coefficients).reshape(DETAIL, DETAIL, 3)
    thumb = cv2.GaussianBlur(thumb, (0, 0), DETAIL_BAND[0]) - cv2.GaussianBlur(thumb, (0, 0), DETAIL_BAND[1])
    return thumb.astype(np.float16)


@dataclass
class _Stacked:
    """Every fingerprint's hashes and coarse thumbnails as arrays, for tests of many pairs at once."""

    plain: np.ndarray  # (N,) uint64 pHashes
    mirrored: np.ndarray  # (N,) uint64 pHashes of the mirrored images
    thumbs: np.ndarray  # (N, T) float32 coarse thumbnails
    thumbs_mirrored: np.ndarray  # (N, T)

    @classmethod
    def of(cls, prints: Sequence[Fingerprint]) -> _Stacked:
        return cls(
            np.array([p.hashes[0] for p in prints], np.uint64),
            np.array([p.hashes[1] for p in prints], np.uint64),
            np.stack([p.thumbs[0] for p in prints]) if prints else np.zeros((0, 0), np.float32),
            np.stack([p.thumbs[1] for p in prints]) if prints else np.zeros((0, 0), np.float32),
        )

    def all_candidates(
        self, left: list[int], right: list[int], max_distance: int, min_similarity: float
    ) -> bool:
        """Whether every (left, right) pair is a candidate: pHashes first, thumbnails only when those pass, in
        blocks of CHUNK rows, stopping at the first pair that is not."""
        cols = np.asarray(right)
        for start in range(0, len(left), CHUNK):
            rows = np.asarray(left[start : start + CHUNK])
            plain = np.bitwise_count(self.plain[rows, None] ^ self.plain[None, cols])  # (R, C)
            mirrored = np.bitwise_count(self.plain[rows, None] ^ self.mirrored[None, cols])
            if (np.minimum(plain, mirrored) > max_distance).any():
                return False
            left_thumbs = self.thumbs[rows]  # (R, T)
            similarity = np.maximum(
                left_thumbs @ self.thumbs[cols].T, left_thumbs @ self.thumbs_mirrored[cols].T
            )
            if (similarity < min_similarity).any():
                return False
        return True


def candidate_pairs(
    prints: Sequence[Fingerprint] | _Stacked, max_distance: int, min_similarity: float
) -> Iterator[tuple[int, int, float, bool]]:
    """(i, j, coarse similarity, mirrored) with i < j for every candidate pair, CHUNK rows of i at a time."""
    stacked = prints if isinstance(prints, _Stacked) else _Stacked.of(prints)
    if len(stacked.plain) < 2:
        return
    plain, mirrored = stacked.plain, stacked.mirrored  # (N,)
    thumbs, thumbs_mirrored = stacked.thumbs, stacked.thumbs_mirrored  # (N, T)
    # Buffers reused for every chunk: allocating CHUNK x N arrays each time cost 10x the arithmetic (page faults).
    xor = np.empty((CHUNK, len(plain)), np.uint64)
    distance, mirrored_distance = np.empty((2, CHUNK, len(plain)), np.uint8)
    for start in range(0, len(plain), CHUNK):
        rows_here = len(plain[start : start + CHUNK])
        x, d, dm = xor[:rows_here], distance[:rows_here], mirrored_distance[:rows_here]  # (C, N)
        np.bitwise_count(np.bitwise_xor(plain[start : start + CHUNK, None], plain[None, :], out=x), out=d)
        np.bitwise_count(np.bitwise_xor(plain[start : start + CHUNK, None], mirrored[None, :], out=x), out=dm)
        np.minimum(d, dm, out=d)
        rows, cols = np.nonzero(d <= max_distance)
        upper = cols > rows + start
        rows, cols = rows[upper], cols[upper]
        similarity, flipped = _similarities(thumbs, thumbs_mirrored, rows + start, cols)
        for r, c, sim, flip in zip(
            rows.tolist(), cols.tolist(), similarity.tolist(), flipped.tolist(), strict=True
        ):
            if sim >= min_similarity:
                yield r + start, c, float(sim), bool(flip)


def _similarities(
    thumbs: np.ndarray, mirrored: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Correlation (mirror included) of the thumbnail pairs (rows[k], cols[k]) that passed the pHash test, and
    whether the mirrored one matched better: only those are computed (few in most data sets), in batches of
    PAIR_BATCH to bound memory."""
    out, flipped = np.empty(len(rows), np.float32), np.empty(len(rows), bool)
    for start in range(0, len(rows), PAIR_BATCH):
        r, c = rows[start : start + PAIR_BATCH], cols[start : start + PAIR_BATCH]
        left = thumbs[r]  # (P, T)
        plain, mirror = np.einsum("pt,pt->p", left, thumbs[c]), np.einsum("pt,pt->p", left, mirrored[c])
        out[start : start + PAIR_BATCH] = np.maximum(plain, mirror)
        flipped[start : start + PAIR_BATCH] = mirror > plain
    return out, flipped


def detail_similarity(a: Fingerprint, b: Fingerprint, mirrored: bool) -> float:
    """The best correlation of one detail thumbnail's central part inside the other (either way round, b
    mirrored when it is the mirror image), over crop scales and shifts."""
    first, second = a.detail.astype(np.float32), b.detail.astype(np.float32)
    if mirrored:
        second = np.ascontiguousarray(second[:, ::-1])
    return max(_best_match(first, second), _best_match(second, first))


def _best_match(image: np.ndarray, other: np.ndarray) -> float:
    """other's central TEMPLATE share searched in image enlarged as if other were a crop keeping a share
    (CROP_SCALES) of each side of it, at every shift. Both (DETAIL, DETAIL, 3) float32."""
    margin = round(DETAIL * (1 - TEMPLATE) / 2)
    template = other[margin : DETAIL - margin, margin : DETAIL - margin]
    best = -1.0
    for keep_x in CROP_SCALES:
        for keep_y in CROP_SCALES:
            size = (round(DETAIL / keep_x), round(DETAIL / keep_y))
            zoomed = (
                cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
                if size != image.shape[1::-1]
                else image
            )
            best = max(best, float(cv2.matchTemplate(zoomed, template, cv2.TM_CCOEFF_NORMED).max()))
    return best


def near_duplicate_pairs(
    prints: Sequence[Fingerprint], settings: NearDuplicateSettings
) -> Iterator[tuple[int, int, float]]:
    """(i, j, detail similarity) of every near-duplicate pair: candidates whose details agree (all of them
    verified: benchmarks; the doctor's grouping verifies only the candidates it needs)."""
    for i, j, _, mirrored in candidate_pairs(prints, settings.max_distance, settings.min_similarity):
        detail = detail_similarity(prints[i], prints[j], mirrored)
        if detail >= settings.min_detail:
            yield i, j, detail


def group_without_chaining(prints: Sequence[Fingerprint], settings: NearDuplicateSettings) -> list[list[int]]:
    """Groups (sorted indices, more than one member) grown from near-duplicate pairs, the most similar
    candidates of each chunk of rows first: two groups join only when every image of one is a candidate of
    every image of the other."""
    group_of = list(range(len(prints)))
    members: dict[int, list[int]] = {i: [i] for i in range(len(prints))}
    stacked = _Stacked.of(prints)
    candidates = candidate_pairs(stacked, settings.max_distance, settings.min_similarity)
    for _, pairs in itertools.groupby(candidates, key=lambda pair: pair[0] // CHUNK):  # one chunk at a time
        for i, j, _, mirrored in sorted(pairs, key=lambda pair: -pair[2]):
            a, b = group_of[i], group_of[j]
            if a == b:
                continue
            if not stacked.all_candidates(
                members[a], members[b], settings.max_distance, settings.min_similarity
            ):
                continue
            if detail_similarity(prints[i], prints[j], mirrored) < settings.min_detail:
                continue
            keep, gone = (a, b) if len(members[a]) >= len(members[b]) else (b, a)
            for k in members.pop(gone):
                group_of[k] = keep
                members[keep].append(k)
    return sorted(sorted(group) for group in members.values() if len(group) > 1)


def group_pairs(count: int, pairs: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Connected components (union-find) of the pairs with more than one member, each sorted, by first."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    return sorted(group for group in members.values() if len(group) > 1)


def merge_groups(*group_lists: list[list[str]]) -> list[list[str]]:
    """Groups sharing an image become one (an exact copy of a near-duplicate joins its group)."""
    names = sorted({name for groups in group_lists for group in groups for name in group})
    index = {name: i for i, name in enumerate(names)}
    pairs = [(index[g[0]], index[n]) for groups in group_lists for g in groups for n in g[1:]]
    return [[names[i] for i in group] for group in group_pairs(len(names), pairs)]


def near_duplicate_groups(
    names: Sequence[str], prints: Sequence[Fingerprint | None], settings: NearDuplicateSettings
) -> list[list[str]]:
    """Groups of image names that are near-duplicates (None: an image without a fingerprint, left out)."""
    index = [i for i, p in enumerate(prints) if p is not None]
    groups = group_without_chaining([prints[i] for i in index], settings)
    return [[names[index[k]] for k in group] for group in groups]


def leaking_groups(groups: list[list[str]], split_of: dict[str, str]) -> list[list[str]]:
    """Groups whose members sit in more than one split (images in no split do not count)."""
    return [g for g in groups if len({split_of[n] for n in g if split_of.get(n, NO_SPLIT)}) > 1]


def home_split(group: list[str], split_of: dict[str, str], order: Sequence[str]) -> str:
    """Where a leaking group goes: the split holding most of it; a tie goes to the earlier split of
    `order` (train first: val/test lose an image rather than keep a copy of a training image)."""
    counts = {s: sum(split_of.get(n) == s for n in group) for s in order}
    return max(order, key=lambda s: (counts[s], -order.index(s)))


def contact_sheet(paths: Sequence[Path], captions: Sequence[str], thumb: int = 256) -> np.ndarray:
    """One picture of a group: every member letterboxed to thumb x thumb with its caption, in a grid."""
    tiles = []
    for path, caption in zip(paths, captions, strict=True):
        try:
            image, _ = letterbox_or_resize(read_image_rgb(path), (thumb, thumb), keep_ratio=True)
        except (ImageReadError, OSError):
            image = np.full((thumb, thumb, 3), 114, np.uint8)
        tiles.append(put_title(image, caption))
    return tile_images(tiles, tile_size=(thumb, thumb))
