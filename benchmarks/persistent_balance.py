"""Host model of the persistent forward's static schedule for causal calls: per-program work (key tiles + a fixed
per-item cost) when nprog programs take positions pid, pid + nprog, ... of the items, in the grid's order
((batch, head) outer, each head's tiles longest first) or in ``gluon_schedule.persistent_item``'s LPT order
(mirrored here: every head's longest tile first, odd full rounds reversed), and of the host's work list that
replaces that order since session 19 (``_hostinfo.causal_schedule``: heads in L2-sized groups, each round handed
to the least-loaded programs; its own item cost). Prints the makespan (the busiest program's work) over the mean
for flash-attn's grid shapes; 1.0 is perfect balance.

    python benchmarks/persistent_balance.py [--sms 132] [--head-dim 128] [--item-cost 1.5]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from tileattn._hostinfo import causal_schedule  # noqa: E402


def lpt_index(pos, pid, nprog, num_items, num_m_tiles):
    """gluon_schedule.persistent_item with LPT, on the host."""
    r = pos // nprog
    if r % 2 == 1 and (r + 1) * nprog <= num_items:
        pos = r * nprog + nprog - 1 - pid
    nbh = num_items // num_m_tiles
    return (pos % nbh) * num_m_tiles + pos // nbh


def tiles_of(g, num_m_tiles):
    """Key tiles (128-wide) of grid index g's causal query tile (program_tile: longest first within a head)."""
    tile = num_m_tiles - 1 - g % num_m_tiles
    return tile + 1


def balance(seqlen, heads, batch, nprog, item_cost, lpt):
    m = -(-seqlen // 128)
    num_items = m * heads * batch
    work = [0.0] * min(nprog, num_items)
    seen = set()
    for pid in range(len(work)):
        for pos in range(pid, num_items, len(work)):
            g = lpt_index(pos, pid, len(work), num_items, m) if lpt else pos
            seen.add(g)
            work[pid] += tiles_of(g, m) + item_cost
    assert seen == set(range(num_items)), "not a bijection"
    return max(work) / (sum(work) / len(work))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--item-cost", type=float, default=1.5, help="fixed cost per item in key-tile units")
    ap.add_argument("--l2-mb", type=int, default=50, help="L2 size for the work list's head groups (H100/H200: 50)")
    a = ap.parse_args()
    heads = 2048 // a.head_dim
    print(f"causal, D={a.head_dim}, {a.sms} programs, item cost {a.item_cost} key tiles: makespan / mean")
    print("seqlen  batch  grid-order  lpt  work-list (heads per group)")
    for s in (512, 1024, 2048, 4096, 8192, 16384):
        b = 16384 // s
        _, listed, per_group = causal_schedule(b, heads, 1, s, s, 128, 128, 4 * a.head_dim, a.sms, a.l2_mb << 20)
        print(f"{s:6d} {b:6d} {balance(s, heads, b, a.sms, a.item_cost, False):11.3f} "
              f"{balance(s, heads, b, a.sms, a.item_cost, True):5.3f} {listed:10.3f} ({per_group})")


if __name__ == "__main__":
    main()
