"""How fast could a fused 5-product backward's main loop be? (NOTES, session 22: the two-kernel backward executes
7 matmuls at ~86% of the ceiling; only the 5-product form can pass cuDNN at D=64/128.)

For D=128 and D=64 cells (bf16, flash-attn's grid: 16k tokens, model dim 2048), one process: the backward's time
(do_bench) with the default two kernels and with ``TILEATTN_GLUON_BWD_PROBE=dq`` (the dK/dV kernel also computes
every dQ product and discards it; the dQ kernel still runs), each kernel's GPU time from torch.profiler (µs per
backward), and
SDPA cuDNN's backward. "fused est." = the probe's dK/dV kernel plus the backward's other kernels but the dQ
kernel: a fused kernel's time before its dQ reduction across programs (v16a: +15% for unordered adds, 2–6%
more for the ordered, deterministic ones) and without the delta pass the dQ kernel now does on the way (a fused
backward needs a separate one: one read of dO, out and its residual, ~0.5% of the backward at 16k). TFLOP/s by
flash-attn's convention (bwd = 2.5 x fwd).

Usage: PYTHONPATH=src python3 benchmarks/bwd_probe.py [--seqlens 1024,4096,16384] [--head-dims 128,64]"""
import argparse
import collections
import os

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import tileattn


def kernel_us(fn, calls=5):
    """GPU µs per call of each kernel that ``fn`` launches (torch.profiler, ``calls`` calls)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = collections.Counter()
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None)
        if us is None:
            us = evt.cuda_time_total
        if us:
            per[evt.key] += us / calls
    return per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--head-dims", default="128,64")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}: bf16 backward, µs per call (TFLOP/s reported), one process")
    for d, s in ((int(d), int(s)) for d in args.head_dims.split(",") for s in args.seqlens.split(",")):
        h = 2048 // d
        b = 16384 // s
        for causal in (False, True):
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
            flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
            out = tileattn.attention(q, k, v, causal=causal)

            def ours():
                out.backward(dout, retain_graph=True)
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

            def cud():
                ref.backward(dout.transpose(1, 2), retain_graph=True)
            rows = {}
            for name, probe in (("two-kernel", ""), ("probe", "dq")):
                os.environ["TILEATTN_GLUON_BWD_PROBE"] = probe
                us = triton.testing.do_bench(ours, grad_to_none=[q, k, v], return_mode="median") * 1e3
                rows[name] = (us, kernel_us(ours))
            os.environ.pop("TILEATTN_GLUON_BWD_PROBE", None)
            cud_us = triton.testing.do_bench(cud, grad_to_none=[qt, kt, vt], return_mode="median") * 1e3
            base, probe = rows["two-kernel"][1], rows["probe"][1]
            dkdv = {n: u for n, u in probe.items() if "dkdv" in n}
            others = sum(u for n, u in probe.items() if "dkdv" not in n and "_dq_kernel" not in n)
            fused = sum(dkdv.values()) + others

            def tf(us):
                return flops / us / 1e6
            two = rows["two-kernel"][0]
            print(f"D={d} S={s} causal={causal}: two-kernel {two:.0f} ({tf(two):.0f}) | "
                  f"with probe {rows['probe'][0]:.0f} | fused est. {fused:.0f} ({tf(fused):.0f}) | cuDNN {cud_us:.0f} "
                  f"({tf(cud_us):.0f})", flush=True)
            print("   kernels, two-kernel: " + ", ".join(f"{n} {u:.0f}" for n, u in base.most_common(6)))
            print("   kernels, probe:      " + ", ".join(f"{n} {u:.0f}" for n, u in probe.most_common(6)))


if __name__ == "__main__":
    main()
