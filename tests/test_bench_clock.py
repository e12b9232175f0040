"""bench_clock: nvidia-smi SM-clock samples beside each benchmark timing (CPU: a fake sampler command)."""
import math
import sys
import time

import pytest

from tileattn import bench, bench_clock


def test_parse_line():
    when, mhz = bench_clock.parse_line("2026/11/29 05:26:04.123, 1980\n")
    assert mhz == 1980.0
    assert when == pytest.approx(time.mktime((2026, 11, 29, 5, 26, 4, 0, 0, -1)) + 0.123, abs=1e-3)
    for bad in ("timestamp, clocks.sm [MHz]", "2026/11/29 05:26:04.123, [N/A]", "", "1980", "a, b, c"):
        assert bench_clock.parse_line(bad) is None


def test_nvml_index():
    assert bench_clock.nvml_index(0, "") == 0
    assert bench_clock.nvml_index(1, "3,5") == 5
    assert bench_clock.nvml_index(0, "GPU-1234abcd") == 0  # a UUID: the CUDA index stands
    assert bench_clock.nvml_index(2, "3,5") == 2


def _fake_command(offsets_mhz):
    """A stand-in for nvidia-smi: prints one timestamped sample per (seconds from now, MHz), then exits."""
    now = time.time()
    lines = []
    for dt, mhz in offsets_mhz:
        t = now + dt
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"
        lines.append(f"{stamp}, {mhz}")
    code = "import sys\nfor ln in %r:\n    print(ln, flush=True)\nprint('junk line')\n" % (lines,)
    return now, [sys.executable, "-c", code]


def test_sampler_windows_and_medians():
    now, cmd = _fake_command([(-1.0, 345), (-0.5, 900), (-0.45, 1500), (-0.4, 1980), (0.2, 1980), (0.5, 1755)])
    clock = bench_clock.ClockSampler(command=cmd)
    assert clock.start()
    clock.settle(now + 0.5, timeout=10)
    clock.stop()
    assert len(clock.samples) == 6
    assert clock.median(now - 0.55, now - 0.35) == 1500.0  # 900, 1500, 1980
    assert clock.median(now - 1.1, now - 0.9) == 345.0
    assert math.isnan(clock.median(now - 0.3, now - 0.1))  # no sample inside
    assert math.isnan(clock.median(now, now + 0.6))  # no sample after the window: not known yet
    assert clock.max_mhz() == 1980.0


def test_sampler_without_the_command():
    clock = bench_clock.ClockSampler(command=["no-such-nvidia-smi-here"])
    assert not clock.start()
    assert math.isnan(clock.median(0.0, 1.0)) and math.isnan(clock.max_mhz())
    clock.stop()  # harmless


def _result(provider, seqlen, mhz):
    r = bench.Result(provider=provider, head_dim=128, causal=True, seqlen=seqlen, batch=1, heads=1, mode="fwd")
    r.sm_clock_mhz = mhz
    return r


def test_slow_clock_note():
    rows = [_result("tileattn", 1024, 1980.0), _result("sdpa_cudnn", 1024, 1965.0), _result("flex", 512, math.nan)]
    assert "every timing at >= 90%" in bench_clock.slow_clock_note(rows)
    rows.append(_result("tileattn", 512, 1200.0))
    note = bench_clock.slow_clock_note(rows)
    assert note.startswith("SM clock") and "1200-1980 MHz" in note
    assert "tileattn fwd d=128 causal s=512 (1200)" in note and "s=1024" not in note
    assert bench_clock.slow_clock_note([_result("tileattn", 512, math.nan)]) == ""


def test_fill_clocks_and_csv(tmp_path):
    class FakeClock:
        def median(self, t0, t1):
            return 1000.0 + t0

    timed = _result("tileattn", 1024, math.nan)
    timed.bench_window = (500.0, 501.0)
    untimed = _result("flex", 1024, math.nan)  # failed: no window
    note = bench.fill_clocks([timed, untimed], FakeClock())
    assert timed.sm_clock_mhz == 1500.0 and math.isnan(untimed.sm_clock_mhz)
    assert note.startswith("SM clock")
    assert bench.fill_clocks([timed], None) == ""
    path = str(tmp_path / "c.csv")
    bench.write_csv([timed, untimed], path)
    back = bench.read_csv(path)
    assert back[0].sm_clock_mhz == 1500.0 and math.isnan(back[1].sm_clock_mhz)


def test_measure_one_records_its_window():
    import torch
    shape = bench.Shape(head_dim=16, seqlen=8, batch=1, heads=1, causal=False)

    class Plain(bench.Provider):
        name = "plain"

        def __call__(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    q, k, v, dout = bench.make_inputs(shape, torch.float32, torch.device("cpu"))
    before = time.time()
    r = bench._measure_one(Plain(), shape, "fwd", q, k, v, dout, bench.wall_clock_bench(1), torch.device("cpu"), None)
    assert r.status == "ok" and r.bench_window is not None
    assert before <= r.bench_window[0] <= r.bench_window[1] <= time.time()
