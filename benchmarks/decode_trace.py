"""Per-program traces of the split-KV decode kernel (GPU): how its programs fill the SMs and the time, against the
whole step (the combine kernel and launch gaps are the rest).

Each program of ``_decode_split_kernel`` writes (start ns, end ns, SM id, keys) through its TRACE buffer
(``common.trace_program3``, %globaltimer: one clock on every SM). Per shape of the decode table (contiguous cache,
bf16, D=128, default split count) this prints the step's CUDA-graph µs (untraced), the split kernel's span and the
bandwidth over it (K and V bytes / span), the programs and the SMs they ran on, the most programs one SM ran at
once and the most it ran in all, program durations (median, min, max), and how far apart the programs started and
ended (the first to the last start; the first end to the last).
Three traced calls per shape (the first compiles); the last counts.

Usage: PYTHONPATH=src python3 benchmarks/decode_trace.py [--shapes 16x16384x64x8;64x4096x32x8] [--splits N]
  a shape: batch x cache x Hq x Hkv (D=128)
"""
import argparse
import os

import torch
import triton

os.environ["TILEATTN_LAUNCH_PLANS"] = "0"  # every call through decode.launch

import tileattn  # noqa: E402
from tileattn import bench_decode  # noqa: E402
from tileattn.kernels import decode  # noqa: E402
from trace_launch import extra_kwargs  # noqa: E402


def traced(fn):
    """Run ``fn`` with the split kernel's launches given a fresh (programs, 4) int64 trace buffer; the last one."""
    bufs = []

    def extra(grid, kwargs):
        bufs.append(torch.full((grid[0] * grid[1] * grid[2], 4), -1, dtype=torch.int64, device="cuda"))
        return {"TRACE": bufs[-1]}
    with extra_kwargs(decode, decode._decode_split_kernel, extra):
        fn()
        torch.cuda.synchronize()
    return bufs[-1]


def summary(buf):
    """The shape's numbers from one launch's trace (µs unless named)."""
    t = buf.cpu().double()
    assert bool((t[:, 1] >= t[:, 0]).all()), "a program did not write its trace"
    t0, t1, sm = t[:, 0] - t[:, 0].min(), t[:, 1] - t[:, 0].min(), t[:, 2].long()
    span = float(t1.max())
    sms = int(sm.max()) + 1
    dur = t1 - t0
    most_at_once = 0
    for s in sm.unique().tolist():  # the most programs one SM held at a time (sweep over its starts and ends)
        mine = sm == s
        events = sorted([(x, 1) for x in t0[mine].tolist()] + [(x, -1) for x in t1[mine].tolist()],
                        key=lambda e: (e[0], e[1]))
        live = 0
        for _, d in events:
            live += d
            most_at_once = max(most_at_once, live)
    return dict(programs=len(t), sms_used=len(sm.unique()), sms=sms, span=span / 1e3,
                most_at_once=most_at_once, most_in_all=int(torch.bincount(sm).max()),
                dur_med=dur.median().item() / 1e3, dur_min=dur.min().item() / 1e3, dur_max=dur.max().item() / 1e3,
                start_spread=float(t0.max()) / 1e3, end_spread=(span - float(t1.min())) / 1e3,
                keys=t[:, 3].sum().item())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=";".join(f"{b}x{c}x{hq}x{hkv}" for b, c, hq, hkv, _ in bench_decode.CONFIGS))
    ap.add_argument("--splits", type=int, default=0, help="num_splits (0: the default count)")
    a = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}: split-KV decode, per-program trace (contiguous cache, bf16, D=128)")
    for shape in a.shapes.split(";"):
        batch, cache, hq, hkv = (int(x) for x in shape.split("x"))
        q, kc, vc, lens = bench_decode.decode_inputs(batch, cache, hq, hkv, 128, torch.device("cuda"), torch.bfloat16)

        def step():
            return tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=a.splits)
        graph = triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median") * 1e3
        for _ in range(3):
            buf = traced(step)
        r = summary(buf)
        nbytes = (kc.numel() + vc.numel()) * kc.element_size()
        gbs = nbytes / r["span"] / 1e3
        print(f"{shape}: step {graph:.1f} us (graph); split kernel span {r['span']:.1f} us ({gbs:.0f} GB/s of K+V),"
              f" {r['programs']} programs on {r['sms_used']} SMs (at most {r['most_at_once']} at once, "
              f"{r['most_in_all']} in all on one SM); program {r['dur_med']:.1f} us (min {r['dur_min']:.1f}, max "
              f"{r['dur_max']:.1f}); starts spread {r['start_spread']:.1f} us, ends {r['end_spread']:.1f} us",
              flush=True)
        q = kc = vc = buf = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
