"""Near-duplicates: re-encoded, resized or lightly cropped copies of one photo.

A copy in train with its twin in test inflates every test metric, and exact hashing (sha256)
misses any copy that was re-saved. Each image gets a 64-bit perceptual hash (pHash: the signs
of the low frequencies of its DCT, via the `imagehash` library) during the decode `prepare`
already does; images whose hashes differ in at most `prepare.near_duplicate_distance` bits
form one group, and `assign_splits` keeps each group in one split.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# pHash looks at a 32x32 thumbnail; shrinking a big photo by an integer factor first (a box
# filter, far cheaper than imagehash's Lanczos over 12 Mpx) leaves the hash as it is.
_HASH_INPUT_SIDE = 1024
# Rows compared at once against all hashes: a 1024 x N block of uint8 distances.
_BLOCK = 1024


def perceptual_hash(img: Image.Image) -> str:
    """The image's 64-bit pHash as 16 hex digits."""
    import imagehash

    factor = max(img.size) // _HASH_INPUT_SIDE
    if factor > 1:
        img = img.reduce(factor)
    return str(imagehash.phash(img))


def _as_uint64(hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def hamming(a: str, b: str) -> int:
    return int(np.bitwise_count(np.uint64(int(a, 16)) ^ np.uint64(int(b, 16))))


def near_duplicate_groups(hashes: list[str], max_distance: int) -> list[list[int]]:
    """Indices of images that are copies of each other, as groups of two or more.

    Grouping is transitive (union-find over every pair within `max_distance`), so a chain of
    copies is one group however far its ends drift apart. All pairs are compared in blocks:
    20,000 images take a few seconds.
    """
    values = _as_uint64(hashes)
    parent = list(range(len(values)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(values), _BLOCK):
        block = values[start:start + _BLOCK]
        close = np.bitwise_count(block[:, None] ^ values[None, :]) <= max_distance
        rows, cols = np.nonzero(close)
        for i, j in zip((rows + start).tolist(), cols.tolist(), strict=True):
            if i < j:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(values)):
        groups.setdefault(root(i), []).append(i)
    return [members for members in groups.values() if len(members) > 1]
