"""Where a call's host time goes (GPU machine): cProfile of back-to-back tileattn calls on tiny shapes, whose GPU
time is negligible, so the wall time per call is the host's.

Usage: PYTHONPATH=src python3 benchmarks/host_profile.py [--calls 1000] [--top 22]

Cases: the forward (``tileattn.attention``, D=128, causal, 128 tokens), forward + backward, and a decode step
(``flash_attn_with_kvcache``, 256 cached keys). For each: wall µs per call, then the functions with the most
self time (µs per call). Run 28 timed ~160-300 µs of host time per forward call against ~40-60 µs for an SDPA
call on the benchmark machine: at 512-1k tokens tileattn's forward is then host-bound.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import tileattn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--top", type=int, default=22)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(1, 128, 8, 128, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(1, 128, 8, 128, device=dev, dtype=dt)
    qd = torch.randn(1, 1, 8, 128, device=dev, dtype=dt)
    kc = torch.randn(1, 256, 8, 128, device=dev, dtype=dt)
    lens = torch.full((1,), 256, dtype=torch.int32, device=dev)

    def fwd():
        with torch.no_grad():
            tileattn.attention(q, q, q, causal=True)

    def fwd_bwd():
        tileattn.attention(q, q, q, causal=True).backward(g)
        q.grad = None

    def decode():
        tileattn.flash_attn_with_kvcache(qd, kc, kc, cache_seqlens=lens)
    for name, fn in (("forward", fwd), ("forward+backward", fwd_bwd), ("decode", decode)):
        for _ in range(30):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.calls):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / args.calls * 1e6
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        print(f"== {name}: {wall:.1f} us per call (wall, no profiler)", flush=True)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
        for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
            print(f"  {tottime / args.calls * 1e6:7.1f} self {cumtime / args.calls * 1e6:7.1f} cum  "
                  f"{ncalls / args.calls:5.1f}x  {os.path.basename(file)}:{line} {func}", flush=True)


if __name__ == "__main__":
    main()
