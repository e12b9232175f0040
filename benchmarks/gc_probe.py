"""Does Python's garbage collector slow tileattn's short calls inside a long benchmark process? (NOTES, run 129:
D=128 causal 512's forward read 0.70x cuDNN inside the grid's process, 0.88-0.90x alone in a fresh one.)

Times that cell's forward (requires_grad inputs, as the bench's fwd cells) and SDPA cuDNN's with do_bench as the
bench does, first in a fresh process state, then after compiling FlexAttention for a few shapes (what the grid's
process holds), each with the collector as it is, frozen (gc.freeze: the objects alive now are never scanned
again) and disabled; counts the collections of each generation during each timing and the Python objects
allocated per tileattn call (tracemalloc, after the launch plan is recorded).

Usage: PYTHONPATH=src python3 benchmarks/gc_probe.py [--no-flex]"""
import gc
import sys
import tracemalloc

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn

COUNTS = [0, 0, 0]


def _count(phase, info):
    if phase == "start":
        COUNTS[info["generation"]] += 1


def timed(fn, mode):
    gc.enable()
    if mode == "frozen":
        gc.collect()
        gc.freeze()
    elif mode == "disabled":
        gc.disable()
    COUNTS[:] = [0, 0, 0]
    try:
        ms = triton.testing.do_bench(fn, warmup=100, rep=50, return_mode="median")
    finally:
        gc.enable()
        gc.unfreeze()
    return ms * 1e3, tuple(COUNTS)


def allocations_per_call(fn, calls=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(calls):
        fn()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    return sum(s.count_diff for s in stats) / calls, sum(s.size_diff for s in stats) / calls


def probe(label):
    b, h, s, d = 32, 16, 512, 128
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def ours():
        return tileattn.attention(q, k, v, causal=True)

    def cud():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    flops = 4 * b * h * s * s * d / 2
    print(f"== {label}: {len(gc.get_objects())} objects tracked by gc")
    for mode in ("enabled", "frozen", "disabled"):
        row = []
        for name, fn in (("tileattn", ours), ("cudnn", cud)):
            us, counts = timed(fn, mode)
            row.append(f"{name} {us:.1f} us ({flops / us / 1e6:.0f} TFLOP/s, collections {counts})")
        print(f"gc {mode}: " + " | ".join(row), flush=True)
    n, size = allocations_per_call(ours)
    print(f"tileattn: {n:.1f} Python allocations left alive per call ({size:.0f} B; net of frees)")


def main():
    gc.callbacks.append(_count)
    print(f"# {torch.cuda.get_device_name()}: D=128 causal 512 forward (B=32, H=16), do_bench median")
    probe("fresh process")
    if "--no-flex" not in sys.argv:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        compiled = torch.compile(flex_attention, dynamic=True)
        for s in (512, 1024, 2048):
            x = torch.randn(16384 // s, 16, s, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, s, s)
            compiled(x, x, x, block_mask=mask).sum().backward()
        probe("after compiling FlexAttention for 3 shapes")


if __name__ == "__main__":
    main()
