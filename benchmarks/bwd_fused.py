"""The fused backward (``TILEATTN_GLUON_BWD_FUSED=1``, session 23's v28a: five matmuls, dQ reduce-added by the
dK/dV kernel) against the default two-kernel backward (seven) and SDPA cuDNN's.

For D=128 and D=64 cells (bf16, flash-attn's grid: 16k tokens, model dim 2048), one process: each backward's time
(do_bench median, µs per call, TFLOP/s by flash-attn's convention: bwd = 2.5 x fwd), then each kernel's GPU time
(torch.profiler, µs per backward) of both tileattn forms, short kernel names. Session 22's probe (the dQ products
computed and discarded) measured the fused form's main loop before it existed (NOTES v26a, run 132).

Usage: PYTHONPATH=src python3 benchmarks/bwd_fused.py [--seqlens 1024,4096,16384] [--head-dims 128,64]"""
import argparse
import collections
import os

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import tileattn


def kernel_us(fn, grads, calls=5):
    """GPU µs per call of each kernel that ``fn`` launches (torch.profiler, ``calls`` calls), the tensors in
    ``grads`` given no .grad before each call (as do_bench's grad_to_none: no accumulation kernels)."""
    def call():
        for t in grads:
            t.grad = None
        fn()
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    per = collections.Counter()
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None)
        if us is None:
            us = evt.cuda_time_total
        if us:
            per[evt.key] += us / calls
    return per


def backward_cell(d, s, causal):
    """One grid cell's training backward, bf16 (flash-attn's grid: batch 16384 / s, heads 2048 / d): (ours, cud,
    (q, k, v), (qt, kt, vt), flops) — tileattn's and SDPA cuDNN's backward as replayable calls (retain_graph), the
    tensors whose grads each fills, and the backward's FLOPs by flash-attn's convention (2.5 x the forward)."""
    h, b = 2048 // d, 16384 // s
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    out = tileattn.attention(q, k, v, causal=causal)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def ours():
        out.backward(dout, retain_graph=True)

    def cud():
        ref.backward(dout.transpose(1, 2), retain_graph=True)
    return ours, cud, (q, k, v), (qt, kt, vt), flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--slots", default="", help="TILEATTN_FUSED_DQ_SLOTS values to time the fused form with "
                    "(comma-separated; empty: the default)")
    ap.add_argument("--no-profile", action="store_true", help="no per-kernel times")
    ap.add_argument("--early", action="store_true", help="also the fused form with TILEATTN_FUSED_DQ_EARLY=1")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}: bf16 backward, µs per call (TFLOP/s reported), one process")
    for d, s in ((int(d), int(s)) for d in args.head_dims.split(",") for s in args.seqlens.split(",")):
        for causal in (False, True):
            ours, cud, (q, k, v), (qt, kt, vt), flops = backward_cell(d, s, causal)
            rows = {}
            variants = [("two-kernel", "0", "", "0"), ("fused", "1", "", "0")] + [
                (f"slots {n}", "1", n, "0") for n in args.slots.split(",") if n]
            if args.early:
                variants.append(("early", "1", "", "1"))
            for name, fused, slots, early in variants:
                os.environ["TILEATTN_GLUON_BWD_FUSED"] = fused
                os.environ["TILEATTN_FUSED_DQ_SLOTS"] = slots
                os.environ["TILEATTN_FUSED_DQ_EARLY"] = early
                us = triton.testing.do_bench(ours, grad_to_none=[q, k, v], return_mode="median") * 1e3
                rows[name] = (us, collections.Counter() if args.no_profile else kernel_us(ours, [q, k, v]))
            os.environ.pop("TILEATTN_GLUON_BWD_FUSED", None)
            os.environ.pop("TILEATTN_FUSED_DQ_SLOTS", None)
            os.environ.pop("TILEATTN_FUSED_DQ_EARLY", None)
            cud_us = triton.testing.do_bench(cud, grad_to_none=[qt, kt, vt], return_mode="median") * 1e3

            def tf(us):
                return flops / us / 1e6
            two = rows["two-kernel"][0]
            fused = rows["fused"][0]
            print(f"D={d} S={s} causal={causal}: two-kernel {two:.0f} ({tf(two):.0f}) | fused {fused:.0f} "
                  f"({tf(fused):.0f}, {two / fused:.2f}x) | cuDNN {cud_us:.0f} ({tf(cud_us):.0f}; fused "
                  f"{cud_us / fused:.2f}x)" + "".join(f" | {n} {u:.0f}" for n, (u, _) in rows.items()
                                                      if n.startswith(("slots", "early"))), flush=True)
            for name in rows:
                print(f"   kernels, {name}: " + ", ".join(f"{n.split('(')[0][:40]} {u:.0f}"
                                                       for n, u in rows[name][1].most_common(6)))

if __name__ == "__main__":
    main()
