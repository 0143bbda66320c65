"""RLE validation decodes exactly like pycocotools and catches what would give silent wrong IoUs."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from pipeline.eval.rle_check import check_counts, decode_counts


def _random_masks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        m = np.zeros((h, w), np.uint8)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        m[y0 : y0 + int(rng.integers(1, h + 1)), x0 : x0 + int(rng.integers(1, w + 1))] = 1
        m |= (rng.random((h, w)) < 0.01).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        out.append((rle["counts"].decode(), (h, w), int(m.sum())))
    return out


def test_valid_masks_pass_and_decode_like_pycocotools():
    masks = _random_masks(200)
    assert check_counts([c for c, _, _ in masks], np.array([s for _, s, _ in masks])) == [None] * 200
    for counts, (h, w), area in masks[:40]:
        runs = decode_counts(counts)
        assert sum(runs) == h * w and sum(runs[1::2]) == area
        assert area == mask_utils.area({"size": [h, w], "counts": counts})


def test_malformed_masks_are_named():
    (good, (h, w), _), (other, (h2, w2), _) = _random_masks(2, seed=1)
    cases = {
        "truncated": good[:-1],
        "empty": "",
        "bad character": good[:-1] + "~",
        "one run too many": good + "1",
        "non-ascii": good + "é",
        "wrong size": other,
    }
    sizes = [(h, w)] * 5 + [(h2 + 1, w2)]
    reasons = check_counts(list(cases.values()), np.array(sizes))
    assert all(r is not None for r in reasons), dict(zip(cases, reasons))
    assert "ASCII" in reasons[4]
    assert "h*w" in reasons[5]


def test_many_masks_at_once_flag_only_the_bad_one():
    masks = _random_masks(50, seed=2)
    counts = [c for c, _, _ in masks]
    counts[17] = counts[17][: len(counts[17]) // 2]
    reasons = check_counts(counts, np.array([s for _, s, _ in masks]))
    assert [i for i, r in enumerate(reasons) if r] == [17]


def _reference_valid(counts: str, h: int, w: int) -> bool:
    """Slow reference: pure-Python rleFrString plus the checks check_counts promises."""
    if not counts.isascii() or any(not 48 <= ord(ch) <= 111 for ch in counts):
        return False
    groups, k = [], 0
    for ch in counts:
        k += 1
        if not (ord(ch) - 48) & 0x20:
            groups.append(k)
            k = 0
    if k or any(g > 6 for g in groups):
        return False
    runs = decode_counts(counts)
    return all(0 <= r < 2**32 for r in runs) and sum(runs) == h * w


def test_fuzzed_counts_agree_with_the_reference_decoder():
    rng = np.random.default_rng(7)
    masks = _random_masks(60, seed=3)
    counts, sizes = [], []
    alphabet = [chr(c) for c in range(40, 120)]
    for c, (h, w), _ in masks:
        for _ in range(5):
            s = list(c)
            for _ in range(int(rng.integers(0, 3))):
                op = rng.integers(0, 3)
                pos = int(rng.integers(0, len(s) + 1))
                if op == 0 and s:
                    s[min(pos, len(s) - 1)] = alphabet[int(rng.integers(len(alphabet)))]
                elif op == 1:
                    s.insert(pos, alphabet[int(rng.integers(len(alphabet)))])
                elif s:
                    del s[min(pos, len(s) - 1)]
            counts.append("".join(s))
            sizes.append((h, w))
    got = [r is None for r in check_counts(counts, np.array(sizes))]
    want = [_reference_valid(c, h, w) for c, (h, w) in zip(counts, sizes)]
    assert got == want
    assert 0 < sum(want) < len(want)  # both outcomes are exercised
