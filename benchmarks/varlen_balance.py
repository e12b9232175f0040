"""Host model of the persistent varlen forward's balance (NOTES v19f): bench_features' random lengths (uniform in
[S/4, S], 16k tokens), the work list sorted by sequence work as _hostinfo.tile_map builds it, each entry costing
its key tiles plus a fixed 1.5 tiles, a static round-robin over 132 programs; prints the busiest program's work
over the mean, in the list's order and with odd full rounds reversed (tile_map's ``rounds``).

    python benchmarks/varlen_balance.py
"""
import random


def model(lens, heads=16, nprog=132, cost=1.5, reverse_odd=False, bm=128):
    """Busiest program's work / mean for sequences of these lengths (q = k), non-causal."""
    items = []
    for n in sorted(lens, reverse=True):  # work per sequence grows with its length: longest first
        tiles = -(-n // bm)
        items += [tiles + cost] * (tiles * heads)
    if reverse_odd:
        for r in range(1, len(items) // nprog, 2):
            items[r * nprog:(r + 1) * nprog] = items[r * nprog:(r + 1) * nprog][::-1]
    work = [0.0] * min(nprog, len(items))
    for i, w in enumerate(items):
        work[i % len(work)] += w
    return max(work) / (sum(work) / len(work))


def main():
    print("seqlen  seqs  list-order  odd-rounds-reversed")
    for s in (2048, 8192):
        for seed in range(4):
            rnd = random.Random(seed)
            lens, total = [], 0
            while True:
                n = rnd.randint(s // 4, s)
                if total + n > 16384:
                    break
                lens.append(n)
                total += n
            print(f"{s:6d} {len(lens):5d} {model(lens):11.3f} {model(lens, reverse_odd=True):20.3f}")


if __name__ == "__main__":
    main()
