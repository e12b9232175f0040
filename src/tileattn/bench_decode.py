"""Decode benchmark (GPU): bandwidth of ``flash_attn_with_kvcache`` against the card's copy bandwidth and SDPA,
all measured in the same run on the same card.

Usage: python -m tileattn.bench_decode [--out-dir DIR]

Decode reads the whole KV cache once per step, so the measure is bandwidth: bytes that must move (K and V up to
each cache length, plus q and out) over time, against a large device-to-device copy (bytes read + written).
Anchors: SDPA (flash / cuDNN / mem-efficient, as each accepts the call) on the contiguous cache.
Status: written without GPU time left in its session; its first GPU run is part of issue 5.
"""

import argparse
import csv
import os

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

# (batch, cache length, q heads, kv heads, head dim)
CONFIGS = [(8, 65536, 32, 8, 128), (64, 4096, 32, 8, 128), (1, 131072, 8, 8, 128), (16, 16384, 64, 8, 128)]
PAGE_SIZES = [None, 256, 16]


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device, nbytes: int = 2 << 30) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    ms = _bench(lambda: b.copy_(a))
    del a, b
    return 2 * nbytes / ms * 1e-6


def run(out_dir: str, dtype=torch.bfloat16):
    import tileattn
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"copy bandwidth {bw:.0f} GB/s (same run)", flush=True)
    print(f"{'batch':>5} {'cache':>7} {'Hq/Hkv':>7} {'D':>4} {'page':>5} {'provider':<16} {'us':>9} {'GB/s':>7} "
          f"{'x copy':>7}", flush=True)
    rows = []
    for batch, cache, hq, hkv, d in CONFIGS:
        torch.manual_seed(0)
        q = torch.randn(batch, 1, hq, d, device=dev, dtype=dtype)
        kc = torch.randn(batch, cache, hkv, d, device=dev, dtype=dtype)
        vc = torch.randn(batch, cache, hkv, d, device=dev, dtype=dtype)
        lens = torch.full((batch,), cache, dtype=torch.int32, device=dev)
        nbytes = (kc.numel() + vc.numel() + 2 * q.numel()) * kc.element_size()
        cases = []
        for page in PAGE_SIZES:
            if page is None:
                cases.append(("tileattn", None, lambda: tileattn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)))
            else:
                npages = cache // page
                perm = torch.randperm(batch * npages, device=dev)
                kp = kc.reshape(batch * npages, page, hkv, d)[perm.argsort()]
                vp = vc.reshape(batch * npages, page, hkv, d)[perm.argsort()]
                bt = perm.view(batch, npages).to(torch.int32)
                cases.append(("tileattn-paged", page, lambda kp=kp, vp=vp, bt=bt: tileattn.flash_attn_with_kvcache(
                    q, kp, vp, cache_seqlens=lens, block_table=bt)))
        qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def call(be=be):
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=hq != hkv)
            cases.append((name, None, call))
        ref = None
        for name, page, call in cases:
            try:
                out = call()
                if name == "tileattn":
                    ref = out.float()
                elif ref is not None and name.startswith("tileattn"):
                    assert (out.float() - ref).abs().max().item() < 2e-2, "paged result differs from contiguous"
                us = _bench(call) * 1e3
                gbs = nbytes / us * 1e-3
                print(f"{batch:>5} {cache:>7} {hq:>3}/{hkv:<3} {d:>4} {str(page or '-'):>5} {name:<16} {us:9.1f} "
                      f"{gbs:7.0f} {gbs / bw:7.2f}", flush=True)
                rows.append(dict(batch=batch, cache=cache, q_heads=hq, kv_heads=hkv, head_dim=d, page=page or 0,
                                 provider=name, us=us, gbps=gbs, x_copy=gbs / bw, copy_gbps=bw,
                                 device=torch.cuda.get_device_name()))
            except Exception as e:  # noqa: BLE001
                print(f"{batch:>5} {cache:>7} {hq:>3}/{hkv:<3} {d:>4} {str(page or '-'):>5} {name:<16} "
                      f"failed: {str(e)[:80]}", flush=True)
        del q, kc, vc, cases
        torch.cuda.empty_cache()
    if out_dir and rows:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"decode_{torch.cuda.get_device_name().replace(' ', '_')}.csv")
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU")
        return 1
    run(args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
