"""Tile counts for a sliding window: tiles per program, masked share, visited / useful query-key pairs.

For the forward (64x64), dQ (128x64) and dK/dV (32x128; 64x128 before cc6f121) tiles of the sm90 D=128 tables
(a window uses the causal entries), and smaller candidates for a window-specific entry. The tile bounds are a
Python copy of ``kv_tile_range`` / ``q_tile_range`` (src/tileattn/kernels/common.py, Sq == Sk so diag = 0), so
this runs anywhere. Usage: python benchmarks/window_tiles.py [left right]   (default 512 512)
"""

import sys


def cdiv(a, b):
    return -(-a // b)


def kv_tile_range(start_m, seqlen_k, left, right, block_m, block_n):
    """(lo, full_lo, full_hi, hi) of the key tiles for query tile start_m (diag = 0)."""
    hi, lo, full_lo, full_hi = seqlen_k, 0, 0, seqlen_k // block_n * block_n
    if right >= 0:
        hi = max(min(hi, start_m + block_m + right), 0)
        full_hi = min(full_hi, max(start_m + right + 1, 0) // block_n * block_n)
    if left >= 0:
        lo = max(start_m - left, 0) // block_n * block_n
        full_lo = cdiv(max(start_m + block_m - 1 - left, 0), block_n) * block_n
    hi_tiles = cdiv(hi, block_n) * block_n
    full_lo = min(full_lo, hi_tiles)
    return lo, full_lo, min(max(full_hi, full_lo), hi_tiles), hi


def q_tile_range(start_n, seqlen_q, left, right, block_m, block_n):
    """(lo, full_lo, full_hi, hi) of the query tiles for key tile start_n (dK/dV; diag = 0)."""
    lo, hi, full_lo, full_hi = 0, seqlen_q, 0, cdiv(seqlen_q, block_m) * block_m
    if right >= 0:
        lo = max(start_n - right, 0) // block_m * block_m
        full_lo = cdiv(max(start_n + block_n - 1 - right, 0), block_m) * block_m
    if left >= 0:
        hi = min(max(start_n + block_n + left, 0), seqlen_q)
        full_hi = min(full_hi, max(start_n + left + 1, 0) // block_m * block_m)
    hi_tiles = cdiv(hi, block_m) * block_m
    full_lo = min(full_lo, hi_tiles)
    return lo, full_lo, min(max(full_hi, full_lo), hi_tiles), hi


def useful_pairs(seqlen, left, right):
    total = 0
    for i in range(seqlen):
        first = 0 if left < 0 else max(0, i - left)
        last = seqlen - 1 if right < 0 else min(seqlen - 1, i + right)
        total += max(0, last - first + 1)
    return total


def tile_counts(seqlen, left, right, block_m, block_n, per_query_tile):
    """(full tiles, masked tiles, programs) summed over the grid."""
    full = masked = programs = 0
    if per_query_tile:  # forward / dQ: one program per query tile, key tiles streamed
        step, tiles = block_n, [kv_tile_range(m, seqlen, left, right, block_m, block_n)
                                for m in range(0, seqlen, block_m)]
    else:  # dK/dV: one program per key tile, query tiles streamed
        step, tiles = block_m, [q_tile_range(n, seqlen, left, right, block_m, block_n)
                                for n in range(0, seqlen, block_n)]
    for lo, full_lo, full_hi, hi in tiles:
        masked += (full_lo - lo) // step + (cdiv(hi - full_hi, step) if hi > full_hi else 0)
        full += max(0, (full_hi - full_lo) // step)
        programs += 1
    return full, masked, programs


def main(argv):
    left, right = (int(argv[0]), int(argv[1])) if len(argv) == 2 else (512, 512)
    for seqlen in (2048, 4096, 8192):
        useful = useful_pairs(seqlen, left, right)
        for name, block_m, block_n, per_query in (("fwd 64x64", 64, 64, True), ("dq 128x64", 128, 64, True),
                                                  ("dkdv 32x128", 32, 128, False),
                                                  ("dq 64x64 (candidate)", 64, 64, True),
                                                  ("dkdv 32x64 (candidate)", 32, 64, False),
                                                  ("dkdv 64x64 (candidate)", 64, 64, False)):
            full, masked, programs = tile_counts(seqlen, left, right, block_m, block_n, per_query)
            visited = (full + masked) * block_m * block_n
            print(f"S={seqlen} {name}: tiles/program {(full + masked) / programs:.1f} "
                  f"(masked {masked / programs:.1f}), visited/useful {visited / useful:.2f}, "
                  f"masked share {masked / (full + masked):.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
