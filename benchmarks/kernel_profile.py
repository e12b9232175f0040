"""Per-kernel GPU time and occupancy of tileattn calls (GPU only): where a feature's extra time goes.

Usage: PYTHONPATH=src python3 benchmarks/kernel_profile.py [--seqlens 2048,8192] [--cases dense,window,varlen_equal]

For each case (D=128, bf16, 16k tokens, model dim 2048, like bench_features) it runs forward + backward in training
mode under torch.profiler and prints the mean device time per kernel per call, so a case's total splits into the
attention kernels and the small ones (memsets, fills, the backward's preprocessing). It then prints, for every
Triton kernel compiled for that case, its registers, shared memory and how many CTAs fit on one SM
(cuOccupancyMaxActiveBlocksPerMultiprocessor), to check whether a program's prologue/epilogue can overlap
another resident program's main loop.
"""
import argparse
import ctypes
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import tileattn  # noqa: E402
from tileattn.kernels import backward as _bk  # noqa: E402
from tileattn.kernels import forward as _fk  # noqa: E402

TOTAL_TOKENS, MODEL_DIM, D = 16384, 2048, 128


def _occupancy_rows(seen):
    """(kernel name, hash, regs, spills, shared, warps, CTAs per SM) for compiled kernels not in ``seen``."""
    cuda = ctypes.CDLL("libcuda.so.1")
    rows = []
    for fn in (_fk._fwd_kernel, _bk._bwd_dq_kernel, _bk._bwd_dkdv_kernel):
        for dev_cache in list(fn.device_caches.values()):
            for kern in list(dev_cache[0].values()):
                if kern.hash in seen:
                    continue
                seen.add(kern.hash)
                kern._init_handles()
                n = ctypes.c_int(0)
                threads = kern.metadata.num_warps * 32
                err = cuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                    ctypes.byref(n), ctypes.c_void_p(kern.function), threads, ctypes.c_size_t(kern.metadata.shared))
                rows.append((kern.name, kern.hash[:8], kern.n_regs, kern.n_spills, kern.metadata.shared,
                             kern.metadata.num_warps, n.value if err == 0 else f"err{err}"))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--cases", default="dense,window,varlen_equal")
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    heads = MODEL_DIM // D
    seen = set()
    print(f"# {torch.cuda.get_device_name()} | {torch.__version__} | D={D} heads={heads} bf16 | "
          f"mean device us per call, {args.iters} calls", flush=True)
    for s in (int(x) for x in args.seqlens.split(",")):
        batch = TOTAL_TOKENS // s
        torch.manual_seed(0)
        mk = lambda *shape: torch.randn(*shape, device=dev, dtype=dt, requires_grad=True)  # noqa: E731
        q, k, v = mk(batch, s, heads, D), mk(batch, s, heads, D), mk(batch, s, heads, D)
        qe, ke, ve = (x.detach().reshape(batch * s, heads, D).clone().requires_grad_(True) for x in (q, k, v))
        cu = torch.arange(0, (batch + 1) * s, s, dtype=torch.int32, device=dev)
        calls = {
            "dense": lambda: tileattn.attention(q, k, v),
            "causal": lambda: tileattn.attention(q, k, v, causal=True),
            "window": lambda: tileattn.attention(q, k, v, window_size=(512, 512)),
            "varlen_equal": lambda: tileattn.flash_attn_varlen_func(qe, ke, ve, cu, cu, s, s),
        }
        for case in args.cases.split(","):
            call = calls[case]
            out = call()
            dout = torch.randn_like(out)
            out.backward(dout)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    out = call()
                    out.backward(dout)
                torch.cuda.synchronize()
            per = defaultdict(float)
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    per[ev.name[:60]] += ev.device_time / args.iters  # device_time: us
            total = sum(per.values())
            print(f"\n{s} {case}: total {total:.1f} us / call (fwd+bwd)", flush=True)
            for name, t in sorted(per.items(), key=lambda kv: -kv[1]):
                print(f"    {t:9.1f}  {name}", flush=True)
            for row in _occupancy_rows(seen):
                print(f"    occupancy {row[0]} {row[1]}: regs {row[2]} spills {row[3]} smem {row[4]} "
                      f"warps {row[5]} -> CTAs/SM {row[6]}", flush=True)
            for t in (q, k, v, qe, ke, ve):
                t.grad = None


if __name__ == "__main__":
    main()
