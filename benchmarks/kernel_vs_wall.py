"""Short forward cells: time per call as the bench takes it (triton do_bench, eager, L2 flushed between calls)
against the same call replayed from a CUDA graph (10 calls per graph, no host work between them), tileattn and SDPA
cuDNN. Where eager time exceeds the graph's, the host (or the launch gaps) sets the eager timing.
With --grad the inputs require gradients (the forward then saves the log-sum-exp for the backward, as the bench's
forward cells time it); without, calls run under no_grad.
Usage: PYTHONPATH=src python3 benchmarks/kernel_vs_wall.py [--grad]"""
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import tileattn


def capture(fn, reps=10):
    """A CUDA graph of ``reps`` calls of ``fn`` (after 3 warm-up calls on a side stream), replayed once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def replay_us(g, reps=10, tries=10):
    """µs per call: the best of ``tries`` timed replays of graph ``g`` (holding ``reps`` calls)."""
    best = float("inf")
    for _ in range(tries):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def graph_us(fn, reps=10):
    """µs per call of ``fn``, CUDA-graph replay (``capture`` + ``replay_us``)."""
    return replay_us(capture(fn, reps), reps)


def main():
    grad = "--grad" in sys.argv
    print(f"# grad={grad} {torch.cuda.get_device_name()}: us per forward call (eager = do_bench as the bench, "
          f"graph = CUDA-graph replay)")
    for d, b, h, s, causal in ((128, 32, 16, 512, True), (128, 16, 16, 1024, True), (64, 32, 32, 512, True),
                               (64, 16, 32, 1024, True), (256, 32, 8, 512, True), (256, 16, 8, 1024, True),
                               (256, 32, 8, 512, False), (128, 32, 16, 512, False), (64, 32, 32, 512, False)):
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                   for _ in range(3))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ours = lambda: tileattn.attention(q, k, v, causal=causal)  # noqa: E731

        def cud():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        with torch.set_grad_enabled(grad):
            row = [triton.testing.do_bench(ours) * 1e3, graph_us(ours), triton.testing.do_bench(cud) * 1e3,
                   graph_us(cud)]
        print(f"D={d} B={b} H={h} S={s} causal={causal}: tileattn eager {row[0]:.1f} graph {row[1]:.1f} | "
              f"cudnn eager {row[2]:.1f} graph {row[3]:.1f} | graph ratio {row[3] / row[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
