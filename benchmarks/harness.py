"""What every benchmark script shares: the machine's name, interleaved timing, peak memory,
tables and the merged results file ``benchmarks/results/<machine>.json``.

The machine is shared and noisy, so implementations are never timed one after the other:
:func:`interleave` runs one step of each in turn, reversing the order every round, and the
speed-up of A over B is the median over rounds of the ratio of their times in that round.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

#: Dense bf16 peak of the GPUs we know (tensor cores, no sparsity), in FLOP/s, for the MFU.
GPU_BF16_PEAK = {
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def cpu_model() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (``platform.processor()`` else)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def cpu_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_name(device: torch.device) -> str:
    """A short file-name-safe name of the machine: ``cpu-epyc-2core``, ``gpu-h100-80gb`` ..."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name.lower().replace("nvidia", "")
        gb = round(props.total_memory / 2**30)
        return f"gpu-{_slug(name)}-{gb}gb"
    words = [w for w in _slug(cpu_model()).split("-") if w not in ("amd", "intel", "r", "tm")]
    return f"cpu-{'-'.join(words[:2]) or 'unknown'}-{cpu_cores()}core"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def describe_device(device: torch.device) -> str:
    """The device in words, for tables and JSON."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {cpu_cores()} cores, {torch.get_num_threads()} threads"


def gpu_bf16_peak(device: torch.device) -> float | None:
    """The card's dense bf16 peak in FLOP/s, None when unknown (or on CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_BF16_PEAK.items():
        if all(part in name for part in key.split()):
            return peak
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, taking turns.

    Round ``r`` calls every function once, in the given order when ``r`` is even and reversed
    when odd, so that a slow period of the machine falls on all of them alike. The first
    ``warmup`` rounds are not timed (their times are kept under ``"<name>:warmup"``).
    ``"<name>:other"`` holds, for each timed call, the share of the machine's CPU time that
    other processes used meanwhile (:func:`foreign_cpu_share`): near 0 on an idle machine.
    """
    device = device or torch.device("cpu")
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    times.update({f"{n}:warmup": [] for n in names})
    times.update({f"{n}:other": [] for n in names})
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            cpu0 = _cpu_counters()
            t0 = time.perf_counter()
            steps[name]()
            synchronize(device)
            dt = time.perf_counter() - t0
            times[f"{name}:warmup" if r < warmup else name].append(dt)
            if r >= warmup:
                times[f"{name}:other"].append(foreign_cpu_share(cpu0, _cpu_counters(), dt))
            if on_step is not None:
                on_step(name, r - warmup, dt)
    return times


def _cpu_counters() -> tuple[float, float]:
    """(CPU seconds all processes spent busy, CPU seconds of this process) so far."""
    own = time.process_time()
    try:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan"), own
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own


def foreign_cpu_share(before: tuple[float, float], after: tuple[float, float], wall: float):
    """Share of all cores' time that other processes were busy between the two counters."""
    busy, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


def paired_speedup(fast: list[float], slow: list[float]) -> float:
    """Median over rounds of ``slow / fast`` (times of the same rounds)."""
    return statistics.median(s / f for f, s in zip(fast, slow, strict=True))


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (``VmHWM``), in MiB."""
    return _status_kb("VmHWM") / 1024


def current_rss_mb() -> float:
    """The process's resident memory now (``VmRSS``), in MiB."""
    return _status_kb("VmRSS") / 1024


def _status_kb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> str:
    """A Markdown table of ``rows`` (floats with 3 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [f"\n{title}" if title else ""]
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def save_results(machine: str, section: str, key: str, value: dict[str, Any]) -> Path:
    """Merge ``value`` into ``results/<machine>.json`` at ``[section][key]`` (other keys stay)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{machine}.json"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data.setdefault(section, {})[key] = value
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def stamp(device: torch.device) -> dict[str, Any]:
    """Where and when a measurement was made."""
    return {
        "device": describe_device(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
