"""Measure candidate tile configs for the forward and backward kernels on the current GPU.

Usage (GPU): PYTHONPATH=src python3 benchmarks/tune.py [--head-dims 64,128] [--seqlen 4096] [--out FILE]
Prints, per (head dim, causal), TFLOP/s of each candidate next to SDPA flash and cuDNN measured in the same run,
and checks each candidate's output against SDPA (max abs diff). The winners go into src/tileattn/configs.py.
"""

import argparse
import json
import math

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from tileattn.configs import BackwardConfig, KernelConfig
from tileattn.kernels.backward import attention_backward
from tileattn.kernels.forward import attention_forward
from tileattn.kernels.params import AttnParams

FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 4),
       (128, 32, 4, 3), (64, 128, 4, 3)]
DKDV = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 2), (64, 64, 4, 3), (32, 64, 4, 3), (128, 128, 8, 2),
        (64, 128, 4, 2), (32, 128, 8, 3)]
DQ = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2),
      (64, 32, 4, 3), (128, 64, 4, 2)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--causal", default="false,true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    results = []
    for d in [int(x) for x in args.head_dims.split(",")]:
        for causal in [c == "true" for c in args.causal.split(",")]:
            s = args.seqlen
            b, h = 16384 // s, 2048 // d
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(4))
            scale = 1 / math.sqrt(d)
            prm = AttnParams(batch=b, max_seqlen_q=s, max_seqlen_k=s, softmax_scale=scale, window_right=0 if causal else -1)
            fl = 4 * b * h * s * s * d / (2 if causal else 1)
            qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
            row = {"head_dim": d, "causal": causal, "seqlen": s}
            for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(be):
                        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                        tf = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                        tb = bench(lambda: o.backward(do.transpose(1, 2), retain_graph=True))
                    row[name] = (fl / tf * 1e-9, 2.5 * fl / tb * 1e-9)
                    if name == "flash":
                        ref_o = o.detach().transpose(1, 2)
                        qt.grad = kt.grad = vt.grad = None
                        o.backward(do.transpose(1, 2))
                        ref_g = [t.grad.transpose(1, 2).float() for t in (qt, kt, vt)]
                except Exception as e:  # noqa: BLE001
                    row[name] = str(e)[:80]
            print(f"D={d} causal={causal} S={s} anchors: flash {row.get('flash')} cudnn {row.get('cudnn')}", flush=True)
            best_f = None
            for c in FWD:
                cfg = KernelConfig(*c)
                try:
                    out, lse = attention_forward(q, k, v, prm, cfg)
                    err = (out.float() - ref_o.float()).abs().max().item()
                    t = bench(lambda: attention_forward(q, k, v, prm, cfg))
                    tf = fl / t * 1e-9
                    print(f"  fwd {c}: {tf:7.1f} TFLOP/s  err {err:.2e}", flush=True)
                    results.append({**row, "kind": "fwd", "cfg": c, "tflops": tf, "err": err})
                    if best_f is None or tf > best_f[1]:
                        best_f = (c, tf)
                except Exception as e:  # noqa: BLE001
                    print(f"  fwd {c}: FAILED {str(e)[:120]}", flush=True)
            if best_f is None:
                continue
            out, lse = attention_forward(q, k, v, prm, KernelConfig(*best_f[0]))

            def run_bwd(kv, dq):
                cfg = BackwardConfig(KernelConfig(*kv), KernelConfig(*dq))
                g = attention_backward(do, q, k, v, out, lse, None, prm, cfg)[:3]
                err = max((a.float() - r).abs().max().item() for a, r in zip(g, ref_g))
                t = bench(lambda: attention_backward(do, q, k, v, out, lse, None, prm, cfg))
                return 2.5 * fl / t * 1e-9, err

            best_kv = (DKDV[0], 0.0)
            for c in DKDV:
                try:
                    tf, err = run_bwd(c, DQ[0])
                    print(f"  bwd dkdv {c} (dq {DQ[0]}): {tf:7.1f}  err {err:.2e}", flush=True)
                    results.append({**row, "kind": "dkdv", "cfg": c, "tflops": tf, "err": err})
                    if tf > best_kv[1]:
                        best_kv = (c, tf)
                except Exception as e:  # noqa: BLE001
                    print(f"  bwd dkdv {c}: FAILED {str(e)[:120]}", flush=True)
            best_dq = (DQ[0], best_kv[1])
            for c in DQ[1:]:
                try:
                    tf, err = run_bwd(best_kv[0], c)
                    print(f"  bwd dq {c} (dkdv {best_kv[0]}): {tf:7.1f}  err {err:.2e}", flush=True)
                    results.append({**row, "kind": "dq", "cfg": c, "tflops": tf, "err": err})
                    if tf > best_dq[1]:
                        best_dq = (c, tf)
                except Exception as e:  # noqa: BLE001
                    print(f"  bwd dq {c}: FAILED {str(e)[:120]}", flush=True)
            print(f"BEST D={d} causal={causal}: fwd {best_f} dkdv {best_kv} dq {best_dq} | "
                  f"flash {row.get('flash')} cudnn {row.get('cudnn')}", flush=True)
            results.append({**row, "kind": "best", "fwd": best_f, "dkdv": best_kv, "dq": best_dq})
            del q, k, v, do, qt, kt, vt
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
