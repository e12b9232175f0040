"""The GPU's SM clock during a benchmark, sampled by ``nvidia-smi`` in the background.

A timing taken while the clock is still ramping up from idle (H200: 345 MHz idle, 1980 MHz boost) or throttled
reads as a slow kernel. The benchmark records the median SM clock over each timing window beside the time
(the ``sm_clock_mhz`` column of its CSV) so that such a cell can be told apart from a slow kernel
(benchmarks/NOTES.md, session 18: the D=128 causal forward at 512-1k tokens varied 0.51-0.81x cuDNN between
processes).

``ClockSampler`` runs ``nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active -lms N``
(line-buffered through ``stdbuf`` where present) and keeps (wall time, MHz, W, reason bits) samples, dated by
nvidia-smi's own timestamps, so pipe buffering delays the reading but not the dating. A driver that does not know
a field makes nvidia-smi refuse the whole query: the sampler then tries the older ``clocks_throttle_reasons.active``
name, then the clock alone. Without nvidia-smi it records nothing and every window reads NaN.

Limits (session 19, run 100, H200): samples 20 ms apart catch an idle or ramping clock, but not a few percent
between kernels — one kernel timed twice in a row read the same TFLOP/s at medians 10% apart (D=128 16k, 617 at
1845 MHz and 618 at 1695). The power draw and the driver's power-cap bits are recorded for the same coarse
question (was the card held down by its power limit during a timing?), with the same sampling caveat.
"""

import datetime
import math
import shutil
import statistics
import subprocess
import threading
import time
from typing import List, Optional, Sequence, Tuple


def nvml_index(cuda_index: int, visible: Optional[str] = None) -> int:
    """nvidia-smi's index of the GPU that CUDA numbers ``cuda_index``: CUDA_VISIBLE_DEVICES (``visible``, read from
    the environment when None) renumbers the GPUs CUDA sees; nvidia-smi does not. Entries that are not plain
    indices (UUIDs) are left as they are: then the CUDA index is used."""
    if visible is None:
        import os
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_index < len(entries) and entries[cuda_index].isdigit():
        return int(entries[cuda_index])
    return cuda_index


# nvidia-smi's clock event (throttle) reason bits that mean the power limit holds the clock down
POWER_CAP_BITS = 0x4 | 0x80  # SW power cap, HW power brake slowdown
_QUERIES = ("timestamp,clocks.sm,power.draw,clocks_event_reasons.active",
            "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active", "timestamp,clocks.sm")


def parse_sample(line: str) -> Optional[Tuple[float, float, float, Optional[int]]]:
    """``"2026/11/29 05:26:04.123, 1980[, 651.20, 0x0000000000000004]"`` -> (POSIX time, MHz, W, reason bits);
    W NaN and bits None where absent or N/A; None for anything else (headers, a clock of N/A)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) not in (2, 4):
        return None
    try:
        when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        mhz = float(parts[1])
    except ValueError:
        return None
    watts, bits = float("nan"), None
    if len(parts) == 4:
        try:
            watts = float(parts[2])
        except ValueError:
            pass
        try:
            bits = int(parts[3], 16)
        except ValueError:
            pass
    return when, mhz, watts, bits


def parse_line(line: str) -> Optional[Tuple[float, float]]:
    """``"2026/11/29 05:26:04.123, 1980"`` -> (POSIX time, 1980.0); None for anything else (headers, N/A)."""
    sample = parse_sample(line)
    return None if sample is None else sample[:2]


class ClockSampler:
    """Background SM-clock (and power) samples of one GPU. ``start()``, then ``median(t0, t1)`` / ``power(t0, t1)``
    / ``capped(t0, t1)`` over ``time.time()`` windows, then ``stop()``. ``command`` replaces the nvidia-smi command
    line (tests); ``commands``, several tried in turn until one yields a sample (tests)."""

    def __init__(self, device_index: int = 0, interval_ms: int = 20, command: Optional[Sequence[str]] = None,
                 commands: Optional[Sequence[Sequence[str]]] = None):
        if commands is not None:
            self.commands = [list(c) for c in commands]
        elif command is not None:
            self.commands = [list(command)]
        else:
            self.commands = [["nvidia-smi", f"--id={device_index}", f"--query-gpu={q}",
                              "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"] for q in _QUERIES]
        self.command = self.commands[0]  # the one that runs, once started
        self.samples: List[Tuple[float, float, float, Optional[int]]] = []
        self._proc = None
        self._thread = None
        self._lock = threading.Lock()

    def start(self, probe_s: float = 3.0) -> bool:
        """Start sampling; False (and no samples ever) when no command is available. A command that exits within
        ``probe_s`` without a sample (nvidia-smi refusing a field it does not know) gives way to the next."""
        for i, command in enumerate(self.commands):
            exe = shutil.which(command[0])
            if exe is None:
                continue
            cmd = [exe] + command[1:]
            stdbuf = shutil.which("stdbuf")
            if stdbuf is not None:
                cmd = [stdbuf, "-oL"] + cmd
            try:
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:
                continue
            self.command = command
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
            if i == len(self.commands) - 1:
                return True
            end = time.time() + probe_s
            while time.time() < end:
                with self._lock:
                    if self.samples:
                        return True
                if self._proc.poll() is not None:
                    self._thread.join(timeout=1)
                    with self._lock:
                        if self.samples:  # it printed its samples and exited (a finite command)
                            return True
                    break
                time.sleep(0.01)
            else:
                return True  # still running: its samples will come
        self._proc = self._thread = None
        return False

    def _read(self):
        for line in self._proc.stdout:
            sample = parse_sample(line)
            if sample is not None:
                with self._lock:
                    self.samples.append(sample)

    def median(self, t0: float, t1: float) -> float:
        """Median MHz of the samples dated in [t0, t1]; NaN when there are none, or when no sample dated after t1
        has arrived yet (the window's samples may still sit in the pipe)."""
        inside = self._window(t0, t1)
        return statistics.median(s[1] for s in inside) if inside else float("nan")

    def _window(self, t0: float, t1: float):
        """The samples dated in [t0, t1]; [] when none, or when no sample dated after t1 has arrived yet."""
        with self._lock:
            if not self.samples or self.samples[-1][0] < t1:
                return []
            return [s for s in self.samples if t0 <= s[0] <= t1]

    def power(self, t0: float, t1: float) -> float:
        """Median power draw (W) over the window; NaN when unknown."""
        watts = [s[2] for s in self._window(t0, t1) if math.isfinite(s[2])]
        return statistics.median(watts) if watts else float("nan")

    def capped(self, t0: float, t1: float) -> float:
        """Fraction of the window's samples in which the driver named the power limit as holding the clock down
        (POWER_CAP_BITS); NaN when unknown."""
        bits = [s[3] for s in self._window(t0, t1) if s[3] is not None]
        return sum(1 for b in bits if b & POWER_CAP_BITS) / len(bits) if bits else float("nan")

    def settle(self, t1: float, timeout: float = 1.0):
        """Wait (up to ``timeout`` s) until a sample dated after ``t1`` has arrived."""
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                if self.samples and self.samples[-1][0] >= t1:
                    return
            if self._proc is None or self._proc.poll() is not None:
                return
            time.sleep(0.01)

    def max_mhz(self) -> float:
        with self._lock:
            return max((s[1] for s in self.samples), default=float("nan"))

    def stop(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)


def slow_clock_note(rows, limit: float = 0.9) -> str:
    """One line naming the timings whose median SM clock was below ``limit`` x the run's highest, or ''."""
    clocks = [r.sm_clock_mhz for r in rows if math.isfinite(r.sm_clock_mhz)]
    if not clocks:
        return ""
    top = max(clocks)
    slow = [r for r in rows if math.isfinite(r.sm_clock_mhz) and r.sm_clock_mhz < limit * top]
    head = f"SM clock (nvidia-smi, median over each timing): {min(clocks):.0f}-{top:.0f} MHz"
    capped = [r for r in rows if math.isfinite(getattr(r, "power_capped", math.nan)) and r.power_capped >= 0.5]
    watts = [r.power_w for r in rows if math.isfinite(getattr(r, "power_w", math.nan))]
    tail = ""
    if watts:
        tail = (f"; power {min(watts):.0f}-{max(watts):.0f} W, the power cap holding the clock in "
                f"{len(capped)} of {len(watts)} timings")
    if not slow:
        return head + f"; every timing at >= {limit:.0%} of the highest" + tail
    cells = ", ".join(f"{r.provider} {r.mode} d={r.head_dim}{' causal' if r.causal else ''} s={r.seqlen} "
                      f"({r.sm_clock_mhz:.0f}{' capped' if r in capped else ''})" for r in slow)
    return head + f"; below {limit:.0%} of the highest: " + cells + tail
