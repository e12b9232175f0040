"""Host model of the K/V traffic from HBM of the causal Gluon forward under three schedules: the plain grid (the
hardware hands the next program, in grid order, to whichever multiprocessor frees up), the persistent grid in
``gluon_schedule.persistent_item``'s LPT order, and the persistent grid on the host's work list
(``_hostinfo.causal_schedule``, v22a). Every program reads its query tile's key tiles 0 .. n-1 one per step (K and
V of one tile: block_n x D x 2 x 2 bytes), after a fixed cost per item (in steps); an LRU cache of ``--l2-mb``
(default 25: Hopper's L2 is two 25 MB halves, each holding what its side reads) stands for the L2. Prints the HBM
bytes per call and their ratio to the plain grid's, for flash-attn's grid shapes (16k tokens, model dim 2048).

    python benchmarks/l2_traffic.py [--head-dim 128] [--sms 132] [--l2-mb 25] [--item-cost 1.5]
"""
import argparse
import collections
import heapq
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from persistent_balance import lpt_index, tiles_of  # noqa: E402
from tileattn._hostinfo import causal_schedule  # noqa: E402


def simulate(programs, tile_bytes, l2_bytes, item_cost, shared=0):
    """HBM bytes read. programs: per program a list of items (head, key tiles); shared > 0: programs[0] is one
    queue that ``shared`` programs draw from in order as they free up (the plain grid)."""
    capacity = max(1, l2_bytes // tile_bytes)
    lru = collections.OrderedDict()
    misses = 0
    queues = [collections.deque(p) for p in programs]
    common = queues[0] if shared else None
    nprog = shared or len(programs)
    # event loop: each program (head, next tile, tiles left, busy-until); time advances in steps
    heap = [(0.0, p) for p in range(nprog)]
    heapq.heapify(heap)
    state = {}
    while heap:
        t, p = heapq.heappop(heap)
        cur = state.get(p)
        if cur is None or cur[1] >= cur[2]:  # take the next item
            q = common if shared else queues[p]
            if not q:
                continue
            head, n = q.popleft()
            state[p] = [head, 0, n]
            heapq.heappush(heap, (t + item_cost, p))
            continue
        head, j, n = cur
        key = (head, j)
        if key in lru:
            lru.move_to_end(key)
        else:
            misses += 1
            lru[key] = True
            if len(lru) > capacity:
                lru.popitem(last=False)
        cur[1] += 1
        heapq.heappush(heap, (t + 1.0, p))
    return misses * tile_bytes


def schedules(seqlen, head_dim, sms, l2_bytes):
    heads = 2048 // head_dim
    batch = 16384 // seqlen
    num_m = seqlen // 128
    nbh = batch * heads
    n_items = num_m * nbh
    # the plain grid: (batch, head) outer, tiles last to first (program_tile with LONGEST_FIRST)
    grid = [(g // num_m, tiles_of(g, num_m)) for g in range(n_items)]
    nprog = min(sms, n_items)
    lpt = [[] for _ in range(nprog)]
    for p in range(nprog):
        for pos in range(p, n_items, nprog):
            g = lpt_index(pos, p, nprog, n_items, num_m)
            lpt[p].append((g // num_m, tiles_of(g, num_m)))
    entries, _, _ = causal_schedule(batch, heads, 1, seqlen, seqlen, 128, 128, 4 * head_dim, sms, l2_bytes * 2)
    lst = [[] for _ in range(nprog)]
    for p in range(nprog):
        for i in range(p, len(entries), nprog):
            e = entries[i]
            h, b, t = e % heads, (e // heads) % batch, e // heads // batch
            lst[p].append((b * heads + h, t + 1))  # Sq == Sk: query tile t sees key tiles 0 .. t
    return grid, lpt, lst, nprog


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--l2-mb", type=float, default=25.0, help="the LRU's size (one of Hopper's two L2 halves)")
    ap.add_argument("--item-cost", type=float, default=1.5, help="fixed steps per item (Q load, epilogue)")
    a = ap.parse_args()
    l2 = int(a.l2_mb * (1 << 20))
    tile_bytes = 128 * a.head_dim * 2 * 2
    print(f"causal, D={a.head_dim}, {a.sms} programs, LRU {a.l2_mb:g} MB: K/V bytes read from HBM per call (MB)")
    print("seqlen  batch   grid     lpt  (x grid)   list  (x grid)")
    for s in (512, 1024, 2048, 4096, 8192, 16384):
        grid, lpt, lst, nprog = schedules(s, a.head_dim, a.sms, l2)
        g = simulate([grid], tile_bytes, l2, a.item_cost, shared=nprog) / 2**20
        p = simulate(lpt, tile_bytes, l2, a.item_cost) / 2**20
        w = simulate(lst, tile_bytes, l2, a.item_cost) / 2**20
        print(f"{s:6d} {16384 // s:6d} {g:7.0f} {p:7.0f} {p / g:7.2f}x {w:7.0f} {w / g:7.2f}x")


if __name__ == "__main__":
    main()
