"""Near-duplicate images: perceptual hash (imagehash's DCT pHash) + a band-pass thumbnail check, grouped.

Re-encoded, resized, slightly cropped or brightened copies and neighbouring video frames look alike at low
resolution. Two images are a pair when BOTH hold (a mirrored copy counts too: every image is also
fingerprinted mirrored):
- their 64-bit pHashes differ in at most `max_distance` bits (cheap, from the maintained imagehash library);
- the correlation of their band-pass colour thumbnails (central 80%, difference of Gaussians at 32x32, kept
  as 16x16x3) is at least `min_similarity`. pHash alone could not reach the target on planted copies: its
  grey low frequencies are shared by unrelated scenes of one kind, and a 10% crop moves it as far; a grey
  thumbnail still paired 2% of unrelated scenes, colour none (benchmarks/near_duplicates.py).
Pairs chain into groups (frames of one video become one group). split keeps every group in one split; the
doctor lists groups inside a split and across splits (leaks) with a contact sheet per group.

Memory: 2 hashes + 2 thumbnails (6 KB) per image. All pairs' pHashes are compared in chunks of CHUNK rows;
thumbnails only for the pairs whose pHashes are close.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

PRE_SIZE = 128  # grey thumbnail the pHash is computed from: area-averaging a full image down is fast
THUMB = 32  # side of the band-pass thumbnail
STORED = 16  # side of the thumbnail kept per image
CENTRAL = 0.8  # share of each side the thumbnail covers: the borders are what a crop removes
BAND = (2.0, 8.0)  # Gaussian sigmas (thumbnail pixels) of the band pass: no pixel noise, no global gradient
CHUNK = 256  # rows compared at once: CHUNK x N pHash distances
PAIR_BATCH = 2048  # thumbnail pairs correlated at once (3 x 6 MB)

NO_SPLIT = ""


@dataclass
class Fingerprint:
    """What near-duplicate search keeps of one image (the image itself is not kept)."""

    hashes: tuple[int, int]  # pHash of the image, of the mirrored image (64-bit)
    thumbs: np.ndarray  # (2, STORED * STORED * 3) float32 unit-norm band-pass thumbnails: plain, mirrored


def fingerprint(rgb: np.ndarray) -> Fingerprint:
    """Fingerprint of an RGB uint8 (H, W, 3) image of any size."""
    small_rgb = cv2.resize(rgb, (PRE_SIZE, PRE_SIZE), interpolation=cv2.INTER_AREA)
    small = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2GRAY)
    mirrored = np.ascontiguousarray(small[:, ::-1])
    mirrored_rgb = np.ascontiguousarray(small_rgb[:, ::-1])
    return Fingerprint(
        (_phash(small), _phash(mirrored)), np.stack([_band_pass(small_rgb), _band_pass(mirrored_rgb)])
    )


def _phash(gray: np.ndarray) -> int:
    import imagehash
    from PIL import Image

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


def close_pairs(
    prints: Sequence[Fingerprint], max_distance: int, min_similarity: float
) -> Iterator[tuple[int, int, int, float]]:
    """(i, j, pHash distance, thumbnail similarity) with i < j for every near-duplicate pair."""
    if len(prints) < 2:
        return
    plain = np.array([p.hashes[0] for p in prints], np.uint64)  # (N,)
    mirrored = np.array([p.hashes[1] for p in prints], np.uint64)
    thumbs = np.stack([p.thumbs[0] for p in prints])  # (N, T)
    thumbs_mirrored = np.stack([p.thumbs[1] for p in prints])
    # Buffers reused for every chunk: allocating CHUNK x N arrays each time cost 10x the arithmetic (page faults).
    xor = np.empty((CHUNK, len(prints)), np.uint64)
    distance, mirrored_distance = np.empty((2, CHUNK, len(prints)), np.uint8)
    for start in range(0, len(prints), CHUNK):
        rows_here = len(plain[start : start + CHUNK])
        x, d, dm = xor[:rows_here], distance[:rows_here], mirrored_distance[:rows_here]  # (C, N)
        np.bitwise_count(np.bitwise_xor(plain[start : start + CHUNK, None], plain[None, :], out=x), out=d)
        np.bitwise_count(np.bitwise_xor(plain[start : start + CHUNK, None], mirrored[None, :], out=x), out=dm)
        np.minimum(d, dm, out=d)
        rows, cols = np.nonzero(d <= max_distance)
        upper = cols > rows + start
        rows, cols = rows[upper], cols[upper]
        similarity = _similarities(thumbs, thumbs_mirrored, rows + start, cols)
        for r, c, sim in zip(rows.tolist(), cols.tolist(), similarity.tolist(), strict=True):
            if sim >= min_similarity:
                yield r + start, c, int(d[r, c]), float(sim)


def _similarities(thumbs: np.ndarray, mirrored: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Correlation (mirror included) of the thumbnail pairs (rows[k], cols[k]) that passed the pHash test:
    only those are computed (few in most data sets), in batches of PAIR_BATCH to bound memory."""
    out = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), PAIR_BATCH):
        r, c = rows[start : start + PAIR_BATCH], cols[start : start + PAIR_BATCH]
        left = thumbs[r]  # (P, T)
        out[start : start + PAIR_BATCH] = np.maximum(
            np.einsum("pt,pt->p", left, thumbs[c]), np.einsum("pt,pt->p", left, mirrored[c])
        )
    return out


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
    names: Sequence[str], prints: Sequence[Fingerprint | None], max_distance: int, min_similarity: float
) -> list[list[str]]:
    """Groups of image names that are near-duplicates (None: an image without a fingerprint, left out)."""
    index = [i for i, p in enumerate(prints) if p is not None]
    pairs = [(i, j) for i, j, _, _ in close_pairs([prints[i] for i in index], max_distance, min_similarity)]
    return [[names[index[k]] for k in group] for group in group_pairs(len(index), pairs)]


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
    from src.common.draw import put_title, tile_images
    from src.common.images import ImageReadError, read_image_rgb
    from src.common.network_input import letterbox_or_resize

    tiles = []
    for path, caption in zip(paths, captions, strict=True):
        try:
            image, _ = letterbox_or_resize(read_image_rgb(path), (thumb, thumb), keep_ratio=True)
        except (ImageReadError, OSError):
            image = np.full((thumb, thumb, 3), 114, np.uint8)
        tiles.append(put_title(image, caption))
    return tile_images(tiles, tile_size=(thumb, thumb))
