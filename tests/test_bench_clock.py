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


def test_parse_sample_with_power():
    when, mhz, watts, bits = bench_clock.parse_sample("2026/11/29 05:26:04.123, 1770, 688.41, 0x0000000000000004")
    assert (mhz, watts, bits) == (1770.0, 688.41, 4) and bits & bench_clock.POWER_CAP_BITS
    _, _, watts, bits = bench_clock.parse_sample("2026/11/29 05:26:04.123, 1980, [N/A], [N/A]")
    assert math.isnan(watts) and bits is None
    _, mhz, watts, bits = bench_clock.parse_sample("2026/11/29 05:26:04.123, 1980")
    assert mhz == 1980.0 and math.isnan(watts) and bits is None
    assert bench_clock.parse_sample("2026/11/29 05:26:04.123, 1980, 600") is None  # 3 fields: not a query of ours
    assert bench_clock.parse_line("2026/11/29 05:26:04.123, 1770, 688.41, 0x4")[1] == 1770.0


def _fake_command(offsets_mhz):
    """A stand-in for nvidia-smi: prints one timestamped sample per (seconds from now, MHz[, W, reason bits]), then
    exits."""
    now = time.time()
    lines = []
    for dt, mhz, *power in offsets_mhz:
        t = now + dt
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"
        lines.append(", ".join([stamp, str(mhz)] + [str(x) for x in power]))
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


def test_sampler_power_and_fallback():
    """A first command that exits without a sample (nvidia-smi refusing an unknown field) gives way to the next;
    power and the power-cap fraction per window."""
    now, cmd = _fake_command([(-0.5, 1980, 540.0, "0x0"), (-0.45, 1770, 690.5, "0x4"), (-0.4, 1740, 699.0, "0x84"),
                              (-0.35, 1755, 695.0, "0x0"), (0.2, 1980, 300.0, "0x1")])
    refuse = [sys.executable, "-c", "import sys; print('Field is not a valid field to query.'); sys.exit(2)"]
    clock = bench_clock.ClockSampler(commands=[refuse, cmd])
    assert clock.start(probe_s=10)
    assert clock.command == cmd
    clock.settle(now + 0.2, timeout=10)
    clock.stop()
    assert len(clock.samples) == 5
    assert clock.median(now - 0.46, now - 0.34) == 1755.0
    assert clock.power(now - 0.46, now - 0.34) == 695.0
    assert clock.capped(now - 0.46, now - 0.34) == pytest.approx(2 / 3)
    assert clock.capped(now - 0.55, now - 0.48) == 0.0
    assert math.isnan(clock.power(now - 0.3, now - 0.1))
    clock = bench_clock.ClockSampler(commands=[refuse, refuse])
    assert clock.start(probe_s=10)  # the last command is taken as it is (the clock-only query)
    clock.stop()
    assert math.isnan(clock.power(0.0, 1.0)) and math.isnan(clock.capped(0.0, 1.0))


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
    rows[-1].power_w, rows[-1].power_capped = 699.0, 1.0
    rows[0].power_w, rows[0].power_capped = 520.0, 0.0
    note = bench_clock.slow_clock_note(rows)
    assert "s=512 (1200 capped)" in note and "power 520-699 W, the power cap holding the clock in 1 of 2" in note


def test_fill_clocks_and_csv(tmp_path):
    class FakeClock:
        def median(self, t0, t1):
            return 1000.0 + t0

        def power(self, t0, t1):
            return 600.0 + t1

        def capped(self, t0, t1):
            return 0.75

    timed = _result("tileattn", 1024, math.nan)
    timed.bench_window = (500.0, 501.0)
    untimed = _result("flex", 1024, math.nan)  # failed: no window
    note = bench.fill_clocks([timed, untimed], FakeClock())
    assert timed.sm_clock_mhz == 1500.0 and math.isnan(untimed.sm_clock_mhz)
    assert timed.power_w == 1101.0 and timed.power_capped == 0.75 and math.isnan(untimed.power_w)
    assert note.startswith("SM clock") and "power cap holding the clock in 1 of 1" in note
    assert bench.fill_clocks([timed], None) == ""
    path = str(tmp_path / "c.csv")
    bench.write_csv([timed, untimed], path)
    back = bench.read_csv(path)
    assert back[0].sm_clock_mhz == 1500.0 and math.isnan(back[1].sm_clock_mhz)
    assert back[0].power_w == 1101.0 and back[0].power_capped == 0.75 and math.isnan(back[1].power_capped)


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
