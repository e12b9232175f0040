"""The GPU's SM clock during a benchmark, sampled by ``nvidia-smi`` in the background.

A timing taken while the clock is still ramping up from idle (H200: 345 MHz idle, 1980 MHz boost) or throttled
reads as a slow kernel. The benchmark records the median SM clock over each timing window beside the time
(the ``sm_clock_mhz`` column of its CSV) so that such a cell can be told apart from a slow kernel
(benchmarks/NOTES.md, session 18: the D=128 causal forward at 512-1k tokens varied 0.51-0.81x cuDNN between
processes).

``ClockSampler`` runs ``nvidia-smi --query-gpu=timestamp,clocks.sm -lms N`` (line-buffered through ``stdbuf``
where present) and keeps (wall time, MHz) pairs, dated by nvidia-smi's own timestamps, so pipe buffering delays
the reading but not the dating. Without nvidia-smi it records nothing and every window reads NaN.
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


def parse_line(line: str) -> Optional[Tuple[float, float]]:
    """``"2026/11/29 05:26:04.123, 1980"`` -> (POSIX time, 1980.0); None for anything else (headers, N/A)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 2:
        return None
    try:
        when = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return when, float(parts[1])
    except ValueError:
        return None


class ClockSampler:
    """Background SM-clock samples of one GPU. ``start()``, then ``median(t0, t1)`` over ``time.time()`` windows,
    then ``stop()``. ``command`` replaces the nvidia-smi command line (tests)."""

    def __init__(self, device_index: int = 0, interval_ms: int = 20, command: Optional[Sequence[str]] = None):
        self.command = list(command) if command is not None else [
            "nvidia-smi", f"--id={device_index}", "--query-gpu=timestamp,clocks.sm", "--format=csv,noheader,nounits",
            f"--loop-ms={interval_ms}"]
        self.samples: List[Tuple[float, float]] = []
        self._proc = None
        self._thread = None
        self._lock = threading.Lock()

    def start(self) -> bool:
        """Start sampling; False (and no samples ever) when the command is not available."""
        exe = shutil.which(self.command[0])
        if exe is None:
            return False
        cmd = [exe] + self.command[1:]
        stdbuf = shutil.which("stdbuf")
        if stdbuf is not None:
            cmd = [stdbuf, "-oL"] + cmd
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return True

    def _read(self):
        for line in self._proc.stdout:
            sample = parse_line(line)
            if sample is not None:
                with self._lock:
                    self.samples.append(sample)

    def median(self, t0: float, t1: float) -> float:
        """Median MHz of the samples dated in [t0, t1]; NaN when there are none, or when no sample dated after t1
        has arrived yet (the window's samples may still sit in the pipe)."""
        with self._lock:
            if not self.samples or self.samples[-1][0] < t1:
                return float("nan")
            inside = [mhz for when, mhz in self.samples if t0 <= when <= t1]
        return statistics.median(inside) if inside else float("nan")

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
            return max((mhz for _, mhz in self.samples), default=float("nan"))

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
    if not slow:
        return head + f"; every timing at >= {limit:.0%} of the highest"
    cells = ", ".join(f"{r.provider} {r.mode} d={r.head_dim}{' causal' if r.causal else ''} s={r.seqlen} "
                      f"({r.sm_clock_mhz:.0f})" for r in slow)
    return head + f"; below {limit:.0%} of the highest: " + cells
