"""Contiguous decode: CUDA-graph µs of tileattn per forced split count (``num_splits``) beside the default count and
SDPA's cuDNN backend, on the decode table's shapes, in rotated rounds within one process (median and spread).

Usage: PYTHONPATH=src python3 benchmarks/decode_splits.py [--rounds 3] [--configs 16x16384x64x8,...]
  --splits "16x16384=2,4,5,6,8;64x4096=2,3,4"   counts per (batch x cache); defaults below
"""
import argparse
import statistics
import warnings

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn
from tileattn import bench_decode as bd
from tileattn.decode import _default_splits

SPLITS = {(8, 65536): (5, 7, 8, 10), (64, 4096): (2, 3, 4), (1, 131072): (16, 24, 48, 64),
          (16, 16384): (2, 4, 5, 6, 8, 9)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--splits", default="", help="'BxS=n,n;BxS=n' (replaces the defaults for those shapes)")
    a = ap.parse_args(argv)
    splits = dict(SPLITS)
    for part in filter(None, a.splits.split(";")):
        shape, counts = part.split("=")
        b, s = map(int, shape.split("x"))
        splits[(b, s)] = tuple(int(x) for x in counts.split(","))
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}: contiguous decode, CUDA-graph µs (median of {a.rounds} rotated rounds "
          f"± spread), bf16, one process; 'default' = the count tileattn picks")
    for batch, cache, hq, hkv, d in bd.CONFIGS:
        q, kc, vc, lens = bd.decode_inputs(batch, cache, hq, hkv, d, dev, torch.bfloat16)
        default = _default_splits(batch, hkv, cache, dev, d)
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hq != hkv)
        calls = [("cudnn", cudnn), (f"default({default})", lambda: tileattn.flash_attn_with_kvcache(
            q, kc, vc, cache_seqlens=lens))]
        ref = calls[1][1]().float()
        for n in splits.get((batch, cache), ()):
            if n == default:
                continue
            fn = (lambda n=n: tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=n))
            diff = (fn().float() - ref).abs().max().item()
            assert diff < 2e-2, f"{n} splits differ from the default by {diff}"
            calls.append((str(n), fn))
        times = {name: [] for name, _ in calls}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for r in range(a.rounds):
                for name, fn in calls[r % len(calls):] + calls[:r % len(calls)]:
                    times[name].append(bd._bench_graph(fn) * 1e3)
        base = statistics.median(times["cudnn"])
        cells = []
        for name, ts in times.items():
            m = statistics.median(ts)
            spread = (max(ts) - min(ts)) / m * 100
            cells.append(f"{name} {m:.1f} ({base / m:.3f}) ±{spread:.1f}%")
        print(f"{batch}x{cache} {hq}/{hkv}: " + " | ".join(cells), flush=True)
        q = kc = vc = qt = kt = vt = ref = calls = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
