"""tileattn.bench: FLOP math, grid, tables, CSV, plot, argument parsing, the measuring loop (on CPU with SDPA
and fake providers), and the CLI demo (``python -m tileattn.bench --demo --quick`` in a subprocess).

The GPU-marked tests at the end run the real benchmark path on a tiny grid.
"""

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

import tileattn
from tileattn import bench

from _helpers import ON_GPU


def _res(provider, tflops, seqlen=1024, mode="fwd", head_dim=64, causal=False, status="ok", note=""):
    shape = bench.Shape(head_dim=head_dim, causal=causal, seqlen=seqlen, batch=16384 // seqlen,
                        heads=2048 // head_dim)
    flops = shape.flops(mode)
    ms = flops / (tflops * 1e12) * 1e3 if status == "ok" else float("nan")
    return bench.Result.of(provider, shape, mode, ms=ms, status=status, note=note)


def _fake_results():
    rs = []
    for causal in (False, True):
        for mode in ("fwd", "bwd"):
            for s in (512, 1024, 16384):
                rs.append(_res("tileattn", 300.0, s, mode, causal=causal))
                rs.append(_res("sdpa_flash", 200.0, s, mode, causal=causal))
                rs.append(_res("sdpa_cudnn", 600.0, s, mode, causal=causal))
                rs.append(_res("flex", float("nan"), s, mode, causal=causal, status="unsupported",
                               note="no kernel for this"))
    return rs


# ------------------------------------------------------------------------------------------------ FLOPs
def test_flops_convention():
    # flash-attn: 4 * B * H * S^2 * D, halved when causal; bwd 2.5x, fwd_bwd 3.5x
    assert bench.attention_flops(2, 3, 5, 7, False, "fwd") == 4 * 2 * 3 * 25 * 7
    assert bench.attention_flops(2, 3, 5, 7, True, "fwd") == 4 * 2 * 3 * 25 * 7 / 2
    assert bench.attention_flops(2, 3, 5, 7, False, "bwd") == 2.5 * 4 * 2 * 3 * 25 * 7
    assert bench.attention_flops(2, 3, 5, 7, True, "fwd_bwd") == 3.5 * 4 * 2 * 3 * 25 * 7 / 2
    with pytest.raises(ValueError):
        bench.attention_flops(1, 1, 1, 1, False, "fwdbwd")


def test_tflops_from_ms():
    assert bench.tflops_from_ms(2e12, 1000.0) == pytest.approx(2.0)
    assert bench.tflops_from_ms(1e12, 0.5) == pytest.approx(2000.0)
    for bad in (float("nan"), 0.0, -1.0, float("inf"), None):
        assert math.isnan(bench.tflops_from_ms(1e12, bad))


def test_grid_is_flash_attn_grid():
    shapes = bench.make_grid(bench.DEFAULT_HEAD_DIMS, bench.DEFAULT_SEQLENS, [False, True])
    assert len(shapes) == 3 * 2 * 6
    for s in shapes:
        assert s.batch * s.seqlen == 16384
        assert s.heads * s.head_dim == 2048
    # (head dim, causal) groups are contiguous, seqlens ascending inside
    assert [(s.head_dim, s.causal) for s in shapes[:6]] == [(64, False)] * 6
    assert [s.seqlen for s in shapes[:6]] == list(bench.DEFAULT_SEQLENS)
    # 16k tokens at hd 128, causal: 4 * 1 * 16 * 16384^2 * 128 / 2
    s = bench.Shape(128, True, 16384, 1, 16)
    assert s.flops("fwd") == 4 * 16 * 16384**2 * 128 / 2
    assert bench.make_grid([64], [32768], [False])[0].batch == 1
    with pytest.raises(ValueError):
        bench.make_grid([100], [512], [False])


def test_result_of():
    r = _res("tileattn", 250.0, 4096, "bwd")
    assert r.status == "ok" and r.tflops == pytest.approx(250.0)
    shape = bench.Shape(64, False, 512, 32, 32)
    r = bench.Result.of("flex", shape, "fwd", status="unsupported", note="x")
    assert r.status == "unsupported" and math.isnan(r.ms) and math.isnan(r.tflops)
    r = bench.Result.of("flex", shape, "fwd", ms=float("nan"))
    assert r.status == "error" and math.isnan(r.tflops)


# ------------------------------------------------------------------------------------------------ tables
def test_format_table_ratios_and_missing():
    rs = _fake_results()
    t = bench.format_table(rs, 64, False, "fwd", dtype="bf16")
    lines = t.splitlines()
    assert "fwd" in lines[0] and "head_dim=64" in lines[0] and "causal=False" in lines[0] and "bf16" in lines[0]
    header = lines[1].split()
    assert header[:3] == ["seqlen", "batch", "heads"]
    assert "tileattn" in header and "sdpa_flash" in header and "flex" in header
    assert "flash" in header and "cudnn" in header  # "x flash", "x cudnn" split on spaces
    row16k = next(ln for ln in lines if ln.split() and ln.split()[0] == "16k").split()
    # seqlen batch heads tileattn flash cudnn flex | x flash x cudnn x flex
    assert row16k[:3] == ["16k", "1", "32"]
    assert row16k[3] == "300.0" and row16k[4] == "200.0" and row16k[5] == "600.0" and row16k[6] == "-"
    assert row16k[7] == "1.50" and row16k[8] == "0.50" and row16k[9] == "-"
    assert "not measured" in t and "flex S=512,1k,16k: unsupported (no kernel for this)" in t
    assert bench.format_table(rs, 128, False, "fwd") == ""


def test_format_tables_and_summary():
    rs = _fake_results()
    all_t = bench.format_tables(rs, dtype="bf16")
    assert all_t.count("== ") == 4  # 2 causal x 2 modes
    summ = bench.format_summary(rs)
    assert "x flash" in summ and "x cudnn" in summ
    fwd_line = next(ln for ln in summ.splitlines() if ln.strip().startswith("fwd"))
    assert "1.50 (6)" in fwd_line and "0.50 (6)" in fwd_line and "- (0)" in fwd_line
    assert bench.format_summary([r for r in rs if r.provider != "tileattn"]) == ""


def test_geomean():
    assert bench.geomean([2.0, 8.0]) == pytest.approx(4.0)
    assert bench.geomean([2.0, float("nan"), 8.0]) == pytest.approx(4.0)
    assert math.isnan(bench.geomean([]))


def test_seqlen_label():
    assert [bench.seqlen_label(s) for s in (512, 1024, 2048, 16384, 1000)] == ["512", "1k", "2k", "16k", "1000"]


# --------------------------------------------------------------------------------------------- CSV / plot
def test_csv_roundtrip(tmp_path):
    rs = _fake_results()
    rs[0].max_abs_diff = 1.5e-3
    path = str(tmp_path / "sub" / "r.csv")
    meta = {"device": "NVIDIA H100 80GB HBM3", "dtype": "bf16", "commit": "abc", "timestamp": "t", "tag": "x"}
    bench.write_csv(rs, path, meta)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(rs)
    for col in ("provider", "head_dim", "causal", "seqlen", "batch", "heads", "mode", "ms", "tflops", "device",
                "dtype", "commit", "timestamp"):
        assert col in rows[0]
    assert rows[0]["device"] == "NVIDIA H100 80GB HBM3" and rows[0]["dtype"] == "bf16"
    flex = next(r for r in rows if r["provider"] == "flex")
    assert flex["tflops"] == "nan" and flex["status"] == "unsupported"
    back = bench.read_csv(path)
    assert [(r.provider, r.seqlen, r.mode, r.causal, r.status) for r in back] == \
        [(r.provider, r.seqlen, r.mode, r.causal, r.status) for r in rs]
    assert back[0].tflops == pytest.approx(rs[0].tflops, rel=1e-3)
    assert back[0].max_abs_diff == pytest.approx(1.5e-3)
    assert not os.path.exists(path + ".tmp")


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "p.png")
    assert bench.plot_results(_fake_results(), path, title="test") == path
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert bench.plot_results([], str(tmp_path / "q.png")) is None


def test_output_basename():
    assert bench.output_basename("tileattn", "NVIDIA H100 80GB HBM3", "bfloat16") == "tileattn_h100-80gb-hbm3_bf16"
    assert bench.output_basename("p", "NVIDIA H200", "float16", "try 2/x") == "p_h200_fp16_try-2-x"


# -------------------------------------------------------------------------------------------- arguments
def test_parse_args_defaults():
    a = bench.parse_args([])
    assert a.head_dims == [64, 128, 256]
    assert a.seqlens == [512, 1024, 2048, 4096, 8192, 16384]
    assert a.modes == ["fwd", "bwd", "fwd_bwd"]
    assert a.providers == list(bench.PROVIDERS)
    assert a.causals == [False, True] and a.dtype_name == "bfloat16"
    assert a.out_dir == os.path.join("benchmarks", "results")


def test_parse_args_options():
    a = bench.parse_args(["--head-dims", "128", "--seqlens", "1k,2048", "--modes", "bwd", "--providers",
                          "tileattn,sdpa_cudnn", "--causal", "true", "--dtype", "fp16", "--tag", "t",
                          "--warmup", "5", "--rep", "20", "--check"])
    assert a.head_dims == [128] and a.seqlens == [1024, 2048] and a.modes == ["bwd"]
    assert a.providers == ["tileattn", "sdpa_cudnn"] and a.causals == [True] and a.dtype_name == "float16"
    assert a.warmup == 5 and a.rep == 20 and a.check and a.tag == "t"
    for bad in (["--providers", "flash"], ["--modes", "fwd,back"], ["--head-dims", "x"], ["--causal", "yes"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_dry_run(capsys):
    assert bench.main(["--dry-run", "--head-dims", "64", "--seqlens", "512,1k"]) == 0
    out = capsys.readouterr().out
    assert "4 shapes x 5 providers x 3 modes = 60 measurements" in out


def test_classify_error():
    class OutOfMemoryError(RuntimeError):
        pass
    assert bench.classify_error(OutOfMemoryError("CUDA out of memory. Tried to allocate"))[0] == "oom"
    status, note = bench.classify_error(RuntimeError("No available kernel. Aborting execution."),
                                        ["Flash attention kernel not used because:",
                                         "Flash attention requires head_dim <= 256"])
    assert status == "unsupported" and "head_dim <= 256" in note
    assert bench.classify_error(NotImplementedError("x"))[0] == "unsupported"
    status, note = bench.classify_error(ValueError("boom, bang"))
    assert status == "error" and note.startswith("ValueError") and "," not in note


def test_git_commit_runs():
    c = bench.git_commit()
    assert isinstance(c, str) and c


# ---------------------------------------------------------------------------- measuring loop (CPU stand-ins)
class _FakeProvider(bench.Provider):
    """SDPA math backend under another name (a stand-in for tileattn in the loop test)."""

    def __init__(self, name):
        self.name = name
        self.causal = False
        self.prepared = []

    def prepare(self, shape, device):
        self.causal = shape.causal
        self.prepared.append(shape)

    def __call__(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal).transpose(1, 2)


class _Broken(bench.Provider):
    name = "broken"

    def __call__(self, q, k, v):
        raise RuntimeError("kaboom")


class _Unsupported(bench.Provider):
    name = "nope"

    def __call__(self, q, k, v):
        raise NotImplementedError("head dim not supported")


def test_run_grid_cpu():
    shapes = bench.make_grid([16], [32, 64], [False, True], total_tokens=128, model_dim=32)
    fake = _FakeProvider("tileattn")
    provs = {"tileattn": fake, "broken": _Broken(), "nope": _Unsupported()}
    names = ["tileattn", "sdpa_flash", "sdpa_efficient", "broken", "nope"]
    groups_done = []
    calls = []

    def timer(fn, grad_to_none):
        calls.append(len(grad_to_none))
        return bench.wall_clock_bench(1)(fn, grad_to_none)

    rs = bench.run_grid(shapes, names, list(bench.MODES), torch.float32, torch.device("cpu"), timer,
                        providers=provs, on_group_done=lambda r: groups_done.append(len(r)))
    assert len(rs) == len(shapes) * len(names) * 3
    assert groups_done == [30, 60]
    by = {(r.provider, r.seqlen, r.causal, r.mode): r for r in rs}
    for s in shapes:
        for m in bench.MODES:
            t = by[("tileattn", s.seqlen, s.causal, m)]
            assert t.status == "ok" and t.ms > 0 and t.tflops > 0 and (t.batch, t.heads) == (s.batch, s.heads)
            assert by[("sdpa_flash", s.seqlen, s.causal, m)].status == "ok"  # CPU flash kernel
            assert by[("sdpa_efficient", s.seqlen, s.causal, m)].status == "unsupported"  # not on CPU
            b = by[("broken", s.seqlen, s.causal, m)]
            assert b.status == "error" and "kaboom" in b.note and math.isnan(b.tflops)
            assert by[("nope", s.seqlen, s.causal, m)].status == "unsupported"
    assert fake.prepared and all(c == 3 for c in calls)


def test_run_grid_rounds_cpu():
    """rounds=3: every provider timed three times per shape, taking turns (A B A B A B), one result per (provider,
    mode) from the median round (its note lists the three); unavailable providers once; the median picks the
    middle time, an all-failed cell keeps the first round's failure."""
    shapes = bench.make_grid([16], [32], [False], total_tokens=64, model_dim=32)
    order = []

    class Timed(_FakeProvider):
        def __call__(self, q, k, v):
            order.append(self.name)
            return super().__call__(q, k, v)
    provs = {"tileattn": Timed("tileattn"), "b": Timed("b"), "broken": _Broken(), "gone": RuntimeError("no such")}
    times = iter([3.0, 1.0, 2.0, 5.0, 4.0, 6.0])

    def timer(fn, grad_to_none):
        fn()
        return next(times)
    rs = bench.run_grid(shapes, ["gone", "tileattn", "b", "broken"], ["fwd"], torch.float32, torch.device("cpu"),
                        timer, providers=provs, rounds=3)
    assert [(r.provider, r.status) for r in rs] == [("gone", "unsupported"), ("tileattn", "ok"), ("b", "ok"),
                                                    ("broken", "error")]
    rs = rs[1:]
    assert rs[0].ms == 3.0 and rs[1].ms == 5.0  # rounds: tileattn 3, 2, 4 and b 1, 5, 6
    assert "rounds (ms): 3 / 2 / 4" in rs[0].note and "rounds (ms): 1 / 5 / 6" in rs[1].note
    turns = [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n]  # warm-up + timed call per turn
    assert turns == ["tileattn", "b"] * 3
    bad = [bench.Result.of("x", shapes[0], "fwd", status="error", note="first")] * 2
    assert bench.combine_rounds(bad).note == "first"
    assert bench.parse_args(["--rounds", "2"]).rounds == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


def test_measure_modes_reset_grads_and_time_backward():
    shape = bench.Shape(16, True, 32, 2, 2)
    q, k, v, dout = bench.make_inputs(shape, torch.float32, "cpu", seed=3)
    assert q.requires_grad and not dout.requires_grad and float(q.detach().abs().sum()) > 0
    timed = {}

    def timer(fn, grad_to_none):
        fn()
        timed[len(timed)] = [t.grad is not None for t in grad_to_none]
        return 1.0

    rs = bench.measure_provider(_FakeProvider("tileattn"), shape, ["fwd", "bwd", "fwd_bwd"], q, k, v, dout, timer,
                                "cpu")
    assert [r.status for r in rs] == ["ok"] * 3
    assert timed[0] == [False] * 3 and timed[1] == [True] * 3 and timed[2] == [True] * 3
    assert q.grad is None and k.grad is None and v.grad is None  # reset after each mode
    assert rs[1].tflops == pytest.approx(2.5 * rs[0].tflops)


def test_check_shape_with_fake_attention():
    from tileattn.reference import attention_ref
    shape = bench.Shape(16, True, 32, 2, 2)
    q, k, v, dout = bench.make_inputs(shape, torch.float32, "cpu", seed=4)

    def attn(q, k, v, causal=False):
        p = _FakeProvider("x")
        p.causal = causal
        return p(q, k, v)

    line, diff, ok = bench.check_shape(q, k, v, dout, True, attn, attention_ref)
    assert ok and diff == 0.0 and "OK" in line and "vs fp64" in line

    def wrong(q, k, v, causal=False):
        return attn(q, k, v, causal=not causal)

    line, diff, ok = bench.check_shape(q, k, v, dout, True, wrong, attention_ref)
    assert not ok and diff > 1e-3 and "FAIL" in line


def test_demo_accuracy_rule():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    pt = torch.tensor([1.001, 2.0])
    err, err_pt, bound, ok, _ = bench.accuracy_check("out", torch.tensor([1.002, 2.0]), ref, pt, 2.0, 0.0)
    assert ok and err == pytest.approx(0.002, rel=1e-3) and bound == pytest.approx(0.002, rel=1e-3)
    assert not bench.accuracy_check("out", torch.tensor([1.003, 2.0]), ref, pt, 2.0, 0.0)[3]
    assert not bench.accuracy_check("out", torch.tensor([float("nan"), 2.0]), ref, pt, 2.0, 1.0)[3]
    assert not bench.accuracy_check("out", torch.tensor([1.0]), ref, pt, 2.0, 1.0)[3]
    lse_ref = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    assert bench.accuracy_check("lse", torch.tensor([float("-inf"), 1.0]), lse_ref, lse_ref.float(), 2.0, 0.0)[3]
    assert not bench.accuracy_check("lse", torch.tensor([0.0, 1.0]), lse_ref, lse_ref.float(), 2.0, 1.0)[3]


def test_run_benchmark_cpu_end_to_end(tmp_path, capsys):
    """The GPU entry point run on the CPU (real tileattn through the interpreter, CPU SDPA), tiny grid."""
    args = bench.parse_args(["--head-dims", "16", "--seqlens", "16,32", "--total-tokens", "32", "--model-dim", "32",
                             "--causal", "both", "--modes", "fwd,bwd", "--dtype", "fp16", "--providers",
                             "tileattn,sdpa_flash,sdpa_cudnn", "--check", "--out-dir", str(tmp_path),
                             "--prefix", "cpu", "--tag", "e2e"])
    device = "cuda" if ON_GPU else "cpu"
    timer = None if ON_GPU else bench.wall_clock_bench(1)
    assert bench.run_benchmark(args, device=torch.device(device), bench=timer) == 0
    out = capsys.readouterr().out
    assert "tileattn benchmark" in out and "commit" in out and "x flash" in out and "x cudnn" in out
    files = sorted(os.listdir(tmp_path))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1 and next(iter(stems)).startswith("cpu_") and next(iter(stems)).endswith("_fp16_e2e")
    exts = {os.path.splitext(f)[1] for f in files}
    assert {".csv", ".txt"} <= exts
    rs = bench.read_csv(str(tmp_path / next(f for f in files if f.endswith(".csv"))))
    assert len(rs) == 2 * 2 * 3 * 2
    assert all(r.status == "ok" and r.tflops > 0 for r in rs if r.provider == "tileattn")
    assert all(math.isfinite(r.max_abs_diff) and r.max_abs_diff < 1e-2 for r in rs if r.provider == "tileattn")
    txt = open(tmp_path / next(f for f in files if f.endswith(".txt"))).read()
    assert "check hd=16" in txt and "| OK" in txt and "geometric mean" in txt


def test_demo_case_pass_and_fail():
    from tileattn.reference import attention_ref

    def good(q, k, v, causal=False, return_lse=False):
        out, lse = attention_ref(q, k, v, causal=causal, upcast=False)
        return (out, lse) if return_lse else out

    def wrong(q, k, v, causal=False, return_lse=False):
        return good(q, k, v, causal=not causal, return_lse=return_lse)

    def broken(q, k, v, causal=False, return_lse=False):
        raise RuntimeError("no kernel today")

    case = bench.DemoCase("float16", 1, 20, 20, 4, 2, 24, True)
    checks = bench.run_demo_case(case, "cpu", good, attention_ref)
    assert [c.what for c in checks] == ["out", "lse", "dq", "dk", "dv"] and all(c.passed for c in checks)
    checks = bench.run_demo_case(case, "cpu", wrong, attention_ref)
    assert not any(c.passed for c in checks if c.what != "lse") and not all(c.passed for c in checks)
    table = bench.format_checks(checks)
    assert "FAIL" in table and "B1 S20 H4/2 D24 causal" in table
    checks = bench.run_demo_case(case, "cpu", broken, attention_ref)
    assert len(checks) == 1 and not checks[0].passed and "no kernel today" in checks[0].note


# ------------------------------------------------------------------------------------------------ the CLI
def test_cli_demo_quick(tmp_path):
    """``python -m tileattn.bench --demo --quick`` as a user runs it: without TRITON_INTERPRET in the
    environment (on CPU the module must re-exec itself in interpreter mode)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    src = os.path.dirname(os.path.dirname(os.path.abspath(tileattn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-m", "tileattn.bench", "--demo", "--quick"], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo: all 10 checks passed" in proc.stdout, proc.stdout[-3000:]


# ------------------------------------------------------------------------------------------- GPU (device)
@pytest.mark.gpu
def test_gpu_benchmark_tiny(tmp_path, capsys):
    rc = bench.main(["--head-dims", "64", "--seqlens", "512,1024", "--causal", "both", "--providers",
                     "tileattn,sdpa_flash,sdpa_cudnn,sdpa_efficient", "--warmup", "5", "--rep", "10", "--check",
                     "--out-dir", str(tmp_path), "--prefix", "t"])
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".csv") for f in files) and any(f.endswith(".txt") for f in files)
    rs = bench.read_csv(str(tmp_path / next(f for f in files if f.endswith(".csv"))))
    assert len(rs) == 4 * 4 * 3
    for r in rs:
        if r.provider in ("tileattn", "sdpa_flash"):
            assert r.status == "ok" and r.tflops > 1, r
    assert all(math.isfinite(r.max_abs_diff) for r in rs if r.provider == "tileattn")
    out = capsys.readouterr().out
    assert "x flash" in out and "| OK" in out


@pytest.mark.gpu
def test_gpu_flex_dynamic_compiles(tmp_path):
    rc = bench.main(["--head-dims", "64", "--seqlens", "512,1024,2048", "--causal", "true", "--modes",
                     "fwd,bwd", "--providers", "flex", "--warmup", "5", "--rep", "10", "--no-plot",
                     "--out-dir", str(tmp_path)])
    assert rc == 0
    rs = bench.read_csv(str(tmp_path / next(f for f in os.listdir(tmp_path) if f.endswith(".csv"))))
    assert len(rs) == 6 and all(r.status == "ok" and r.tflops > 1 for r in rs), rs


def test_decode_plot_and_cli(tmp_path, capsys):
    """``python -m tileattn.bench decode`` reaches the decode benchmark (which needs CUDA); its plot draws the
    measured rows and leaves launch-variant rows out."""
    import torch
    from tileattn import bench
    from tileattn.bench_decode import plot_decode
    rows = [dict(batch=8, cache=65536, q_heads=32, kv_heads=8, head_dim=128, page=page, provider=prov, us=500.0,
                 gbps=4000.0, x_copy=x, copy_gbps=4200.0, device="test")
            for prov, page, x in (("tileattn", 0, 0.95), ("tileattn-paged", 16, 0.86), ("sdpa_cudnn", 0, 1.01),
                                  ("tileattn[64,4,2,4]", 0, 0.5))]
    if not torch.cuda.is_available():
        assert bench.main(["decode", "--out-dir", str(tmp_path)]) == 1
        assert "needs a CUDA GPU" in capsys.readouterr().out
    assert plot_decode([rows[-1]], str(tmp_path / "none.png")) is None  # only variant rows: nothing to draw
    try:
        import matplotlib  # noqa: F401  (optional extra: without it plot_decode returns None)
    except ImportError:
        assert plot_decode(rows, str(tmp_path / "decode.png")) is None
        return
    path = plot_decode(rows, str(tmp_path / "decode.png"))
    assert path and (tmp_path / "decode.png").stat().st_size > 1000


def test_decode_explore_settings(monkeypatch):
    """A decode --explore row sets each of its '&'-joined settings (a bare config string is TILEATTN_DECODE_CONFIG)
    while it runs and restores them after."""
    from tileattn.bench_decode import explore_settings
    monkeypatch.delenv("TILEATTN_DECODE_PAGED_TMA", raising=False)
    monkeypatch.setenv("TILEATTN_DECODE_CONFIG", "64,4,2,2")
    with explore_settings("TILEATTN_DECODE_PAGED_TMA=1&32,4,3,2"):
        assert os.environ["TILEATTN_DECODE_PAGED_TMA"] == "1" and os.environ["TILEATTN_DECODE_CONFIG"] == "32,4,3,2"
    assert "TILEATTN_DECODE_PAGED_TMA" not in os.environ and os.environ["TILEATTN_DECODE_CONFIG"] == "64,4,2,2"


def test_env_providers_set_and_restore(monkeypatch):
    """An extra provider switches its variables on while it runs and restores them after: one pair
    (tileattn_grid) or several (tileattn_flat: the persistent grid and the flat pipeline)."""
    monkeypatch.delenv("TILEATTN_GLUON_FLAT", raising=False)
    monkeypatch.setenv("TILEATTN_GLUON_PERSISTENT", "0")
    with bench.make_provider("tileattn_flat").context():
        assert os.environ["TILEATTN_GLUON_PERSISTENT"] == "1" and os.environ["TILEATTN_GLUON_FLAT"] == "1"
    assert os.environ["TILEATTN_GLUON_PERSISTENT"] == "0" and "TILEATTN_GLUON_FLAT" not in os.environ
    with bench.make_provider("tileattn_grid").context():
        assert os.environ["TILEATTN_GLUON_PERSISTENT"] == "0"
    assert "tileattn_flat" in bench.EXTRA_PROVIDERS
