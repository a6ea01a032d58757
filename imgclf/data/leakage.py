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

# pHash is the DCT of a 32x32 grey thumbnail. imagehash makes that thumbnail with a Lanczos
# filter over the whole image, which costs more than the decode; Pillow's bilinear resize
# with reducing_gap (a box reduction first) is much cheaper and finds the same copies
# (`make bench`: near_duplicate_copies_found_* are measured with it). Given a 32x32 image,
# imagehash's own resize is a no-op.
_THUMBNAIL = (32, 32)
# Rows compared at once against all hashes: a 128 x N block of distances stays in the CPU's
# cache, where blocks of 1,024 rows do not.
_BLOCK = 128
# Pairs held before they are merged into the components so far.
_MERGE_AT = 1 << 20


def perceptual_hash(img: Image.Image) -> str:
    """The image's 64-bit pHash as 16 hex digits."""
    import imagehash

    thumbnail = img.convert("L").resize(_THUMBNAIL, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return str(imagehash.phash(thumbnail))


def _as_uint64(hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def diameter(hashes: list[str]) -> int:
    """The largest Hamming distance between two of `hashes` (how far a group drifts)."""
    values = _as_uint64(hashes)
    return max((int(np.bitwise_count(values[start:start + _BLOCK, None] ^ values[None, :]).max())
                for start in range(0, len(values), _BLOCK)), default=0)


def _merged(labels: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each image's component label once `pairs` join the components so far; a label is the
    component's first member (an image index, as later pairs need), not its number."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not any(len(rows) for rows, _ in pairs):
        return labels
    n = len(labels)
    # The new pairs, plus each image's link to its current component's label.
    edges_from = np.concatenate([*(rows for rows, _ in pairs), np.arange(n)])
    edges_to = np.concatenate([*(cols for _, cols in pairs), labels])
    graph = coo_matrix((np.ones(len(edges_from), dtype=np.int8), (edges_from, edges_to)),
                       shape=(n, n))
    _, component = connected_components(graph, directed=False)
    _, first = np.unique(component, return_index=True)
    return first[component]


def near_duplicate_groups(hashes: list[str], max_distance: int) -> list[list[int]]:
    """Indices of images that are copies of each other, as groups of two or more.

    Grouping is transitive (connected components of the graph whose edges are the pairs
    within `max_distance`), so a chain of copies is one group however far its ends drift
    apart. All pairs are compared in blocks; the pairs found merge into the components in
    one vectorised step, or in several when there are millions of them: 20,000 images take
    seconds, even when most of them are copies of each other (frames of one video).
    """
    values = _as_uint64(hashes)
    n = len(values)
    labels = np.arange(n)
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    pending = 0
    for start in range(0, n, _BLOCK):
        block = values[start:start + _BLOCK]
        rows, cols = np.nonzero(np.bitwise_count(block[:, None] ^ values[None, :])
                                <= max_distance)
        rows += start
        keep = rows < cols
        pairs.append((rows[keep], cols[keep]))
        pending += int(keep.sum())
        if pending > _MERGE_AT:  # memory stays bounded when most images are copies
            labels, pairs, pending = _merged(labels, pairs), [], 0
    labels = _merged(labels, pairs)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    return [members for members in groups.values() if len(members) > 1]
