"""v37a hang probe (GPU): the D=64 three-warpgroup persistent forward on shapes chosen to isolate a hang (single
and multiple items per program, with and without the residual), each in its own subprocess with a timeout;
prints OK with the largest difference from the two-warpgroup kernel, or HANG.
Usage: PYTHONPATH=src python3 benchmarks/wg3_probe.py [--timeout 40]"""
import argparse
import os
import subprocess
import sys

SHAPES = [(1, 192, 192, 1, 1, 0), (1, 384, 384, 1, 1, 0), (1, 192, 256, 140, 140, 0), (1, 192, 256, 140, 140, 1),
          (1, 384, 384, 140, 140, 0), (2, 2048, 2048, 8, 8, 0), (2, 2048, 2048, 8, 8, 1), (1, 192, 128, 264, 264, 0)]


def one(b, sq, sk, hq, hkv, grad):
    import torch
    import tileattn
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, sq, hq, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=bool(grad))
    k = torch.randn(b, sk, hkv, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=bool(grad))
    v = torch.randn(b, sk, hkv, 64, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=bool(grad))
    os.environ["TILEATTN_GLUON_FWD_WG"] = "2"
    want = tileattn.attention(q, k, v)
    os.environ["TILEATTN_GLUON_FWD_WG"] = "3"
    got = tileattn.attention(q, k, v)
    torch.cuda.synchronize()
    print(f"OK {float((got.float() - want.float()).abs().max())}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=int, default=40)
    ap.add_argument("--one", default="")
    a = ap.parse_args()
    if a.one:
        one(*map(int, a.one.split(",")))
        return
    for s in SHAPES:
        arg = ",".join(map(str, s))
        try:
            r = subprocess.run([sys.executable, __file__, "--one", arg], capture_output=True, text=True,
                               timeout=a.timeout)
            print(s, (r.stdout.strip().splitlines() or ["no output"])[-1], r.stderr.strip()[-300:], flush=True)
        except subprocess.TimeoutExpired:
            print(s, "HANG (timeout)", flush=True)


if __name__ == "__main__":
    main()
