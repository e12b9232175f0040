"""Backward-only TFLOP/s (2.5x the forward's FLOPs, as the benchmark counts them) of Gluon dK/dV kernel configs
(TILEATTN_GLUON_BWD_CONFIG=block_m,stages,consumer_regs,producer_regs,maxnreg,pipeline) beside the portable
backward (TILEATTN_GLUON=0) and SDPA's cuDNN backward, in one process on one GPU, interleaved over rounds.

Usage: PYTHONPATH=src python3 benchmarks/gluon_bwd_sweep.py --head-dim 128 --configs 64,2,240,24,168,0 32,4,240,24,168,1
       [--envs "TILEATTN_GLUON_DQ=1" "TILEATTN_GLUON_DQ=128,3"] [--seqlens 2048,8192] [--rounds 2]
(--envs: more variants, each a ';'-separated list of environment settings on top of the defaults)
Shapes: flash-attn's grid (16k tokens per batch, model dim 2048), bf16, causal and not.
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import tileattn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--configs", nargs="*", default=[])
    ap.add_argument("--envs", nargs="*", default=[])
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    d = a.head_dim
    h = 2048 // d
    for causal in (False, True):
        for s in (int(x) for x in a.seqlens.split(",")):
            b = max(16384 // s, 1)
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                       for _ in range(3))
            dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
            flops = 2.5 * 4 * b * h * s * s * d * (0.5 if causal else 1.0)
            variants = [("portable", {"TILEATTN_GLUON": "0"})]
            variants += [(c, {"TILEATTN_GLUON": "all", "TILEATTN_GLUON_BWD_CONFIG": c}) for c in a.configs]
            variants += [(e, {"TILEATTN_GLUON": "1", **dict(kv.split("=", 1) for kv in e.split(";"))})
                         for e in a.envs]
            if a.envs:
                variants.insert(1, ("default", {"TILEATTN_GLUON": "1"}))
            knobs = {k for _, env in variants for k in env}
            results = {name: [] for name, _ in variants + [("cudnn", None)]}
            outs = {}
            def use(env):
                for knob in knobs:
                    os.environ.pop(knob, None)
                os.environ.update(env)
            for name, env in variants:  # each variant's own graph (the forward is the same kernel for all)
                use(env)
                outs[name] = tileattn.attention(q, k, v, causal=causal)
            qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True if causal else False)
            for _ in range(a.rounds):
                for name, env in variants:
                    use(env)
                    out = outs[name]
                    ms = triton.testing.do_bench(lambda: out.backward(dout, retain_graph=True), warmup=50, rep=100)
                    results[name].append(flops / ms / 1e9)
                ms = triton.testing.do_bench(lambda: ref.backward(dout.transpose(1, 2), retain_graph=True),
                                             warmup=50, rep=100)
                results["cudnn"].append(flops / ms / 1e9)
            row = "  ".join(f"{n}={max(v):.0f}" for n, v in results.items())
            print(f"D={d} causal={int(causal)} S={s}: {row}", flush=True)


if __name__ == "__main__":
    main()
