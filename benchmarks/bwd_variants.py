"""Backward variants chosen by environment knobs, against each other and SDPA cuDNN's backward, in one process.

Each variant is a set of knobs (``name=KNOB:value+KNOB:value``, e.g. ``kv1=TILEATTN_GLUON_BWD_KV_REGS:1``); the
first is the baseline. For D / seqlen / mask cells (bf16, flash-attn's grid: 16k tokens, model dim 2048) it times
each variant's backward (do_bench median, µs per call; ``--rounds`` interleaved rounds, the best kept, so a slow
moment of the host hits every variant alike), SDPA cuDNN's, and with ``--profile`` each variant's dK/dV and dQ
kernels (torch.profiler GPU µs per backward).

Usage: PYTHONPATH=src python3 benchmarks/bwd_variants.py --variants base=,kv1=TILEATTN_GLUON_BWD_KV_REGS:1
       [--seqlens 1024,4096,16384] [--head-dims 128,64] [--rounds 2] [--profile]"""
import argparse
import os

import torch
import triton

from bwd_fused import backward_cell, kernel_us


def parse_variants(spec):
    """``name=K:v+K:v,name2=...`` -> [(name, {K: v})]; an empty knob list is the defaults; ``;`` in a value stands
    for a comma (comma-separated knobs such as TILEATTN_GLUON_BWD_CONFIG)."""
    out = []
    for item in spec.split(","):
        name, _, knobs = item.partition("=")
        out.append((name, {k: v.replace(";", ",") for k, v in (kv.split(":", 1) for kv in knobs.split("+") if kv)}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", required=True)
    ap.add_argument("--seqlens", default="1024,4096,16384")
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--causal", choices=("both", "true", "false"), default="both")
    args = ap.parse_args()
    variants = parse_variants(args.variants)
    knobs = {k for _, kv in variants for k in kv}
    print(f"# {torch.cuda.get_device_name()}: bf16 backward, µs per call (best of {args.rounds} interleaved "
          f"do_bench medians), one process; variants {variants}")
    for d, s in ((int(d), int(s)) for d in args.head_dims.split(",") for s in args.seqlens.split(",")):
        for causal in {"both": (False, True), "true": (True, ), "false": (False, )}[args.causal]:
            ours, cud, (q, k, v), (qt, kt, vt), flops = backward_cell(d, s, causal)
            best = {}
            kern = {}
            for _ in range(args.rounds):
                for name, kv in variants:
                    for key in knobs:
                        os.environ.pop(key, None)
                    os.environ.update(kv)
                    us = triton.testing.do_bench(ours, grad_to_none=[q, k, v], return_mode="median") * 1e3
                    best[name] = min(best.get(name, us), us)
                    if args.profile and name not in kern:
                        per = kernel_us(ours, [q, k, v])
                        kern[name] = tuple(sum(u for n, u in per.items() if tag in n) for tag in ("dkdv", "_dq_"))
                for key in knobs:
                    os.environ.pop(key, None)
                us = triton.testing.do_bench(cud, grad_to_none=[qt, kt, vt], return_mode="median") * 1e3
                best["cuDNN"] = min(best.get("cuDNN", us), us)
            base = best[variants[0][0]]
            print(f"D={d} S={s} causal={causal}: " + " | ".join(
                f"{n} {u:.0f} ({flops / u / 1e6:.0f} TF, {base / u:.3f}x base)" for n, u in best.items())
                + ("  dK/dV / dQ kernels: " + ", ".join(f"{n} {a:.0f} / {b:.0f}" for n, (a, b) in kern.items())
                   if kern else ""),
                flush=True)


if __name__ == "__main__":
    main()
