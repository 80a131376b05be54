"""Shared measurement code of the benchmark scripts: alternating A/B timing, peak memory, FLOPs.

Method (the same in every script; see docs/benchmarks.md):

* **Timing.** All cases of a comparison live in one process and are run round-robin: every
  round runs each case once (``inner`` back-to-back calls, timed together and divided), and the
  order is rotated from round to round so no case always runs first. Warm-up rounds come first
  and are discarded. A case's time is the **median over rounds**; a ratio ``A / B`` is the
  **median of the per-round ratios** (the two numbers of a round are taken seconds apart, so a
  load change on a shared machine affects both). CUDA work is synchronised before a clock read.
* **Peak memory.** CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.
  CPU: torch has no CPU peak counter and the process RSS mixes allocator caching with
  everything else, so the CPU peak comes from the profiler's allocation events
  (``profile_memory=True``): the running sum of the bytes torch's CPU allocator hands out and
  takes back during the call, whose maximum is the peak *above the level before the call*. Like
  the CUDA number it counts tensor storage only (not Python objects, nor scratch memory a
  library allocates on its own).
* **FLOPs.** ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass (it counts
  matmuls and convolutions; NMS, RoIAlign and elementwise ops count as 0). Achieved GFLOP/s is
  that count over the measured median time, set against the peak of a large square matmul
  measured in the same process and dtype.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "add_common_arguments",
    "alternating_timings",
    "autocast",
    "call_count_differences",
    "count_flops",
    "environment_info",
    "format_table",
    "matmul_peak_flops",
    "operator_calls",
    "paired_ratio",
    "peak_memory_bytes",
    "profile_operators",
    "profile_summary",
    "relative_paths",
    "resolve_device",
    "summarize",
    "synchronize",
    "top_operators_table",
    "write_json",
    "write_results",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------------------------
# command line


def add_common_arguments(parser: argparse.ArgumentParser, *, name: str) -> None:
    """The options every script shares. ``name`` gives the default ``--out`` file name."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:index] (default: cpu)")
    parser.add_argument(
        "--amp", action="store_true",
        help="autocast: float16 on CUDA, bfloat16 on CPU (with a GradScaler when training on CUDA)",
    )
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and 1-2 rounds: checks the script runs, measures nothing")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds per case first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for this process (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generator used")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default: benchmarks/results/{name}_<device>[_amp].json)")


def default_out_path(name: str, device: torch.device, amp: bool) -> Path:
    return RESULTS_DIR / f"{name}_{device.type}{'_amp' if amp else ''}.json"


def resolve_device(args: argparse.Namespace) -> torch.device:
    """Parse ``--device``; fail early (ValueError) if CUDA is asked for and absent."""
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but torch.cuda.is_available() is False")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for flag in ("rounds", "warmup"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag == "rounds" else 0):
            raise ValueError(f"--{flag} must be >= {1 if flag == 'rounds' else 0}, got {value}")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in the device's usual low-precision dtype, or a no-op."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype(device))


# --------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating_timings(
    cases: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int,
    device: torch.device,
    inner: int = 1,
) -> Dict[str, List[float]]:
    """Seconds per call of every case, one value per round, cases interleaved round-robin.

    Args:
        cases: name -> zero-argument callable (one "call").
        rounds: timed rounds; every case runs once per round.
        warmup: untimed rounds first (same interleaving).
        inner: calls per case per round, timed together (use > 1 for microsecond calls so the
            clock's resolution and the loop's overhead do not dominate).
    Returns:
        name -> list of ``rounds`` floats (seconds per call).
    """
    names = list(cases)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # rotate the order every round
            fn = cases[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            synchronize(device)
            elapsed = (time.perf_counter() - start) / inner
            if r >= warmup:
                times[name].append(elapsed)
    return times


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """Median, quartiles and minimum of a list of timings (same unit as the input)."""
    if not values:
        raise ValueError("values must not be empty")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "p25": q1,
        "p75": q3,
        "min": ordered[0],
        "n": len(ordered),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[r] / denominator[r]`` (the A/B ratio of one round)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("numerator and denominator must be non-empty and of the same length")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


# --------------------------------------------------------------------------------------------
# memory


def _cpu_peak_from_profiler(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # "[memory]" events carry the signed size of each allocation (+) and free (-) of torch's
    # allocators; the CPU ones in time order give the live bytes above the starting level.
    cpu = torch.autograd.DeviceType.CPU
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    ]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensor storage allocated by ``fn()`` above the level before the call."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak_from_profiler(fn)


def profile_operators(fn: Callable[[], Any], device: torch.device, *, calls: int = 1) -> Any:
    """torch.profiler's per-operator averages over ``calls`` calls of ``fn()`` (CPU, and CUDA
    on a CUDA device)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    return prof.key_averages()


def top_operators_table(averages: Any, device: torch.device, *, row_limit: int = 25) -> str:
    """The top operators of :func:`profile_operators`'s ``averages`` by self time."""
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        # renamed in torch 2.4; the old name is deprecated
        new_name = bool(averages) and hasattr(averages[0], "self_device_time_total")
        sort_by = "self_device_time_total" if new_name else "self_cuda_time_total"
    return averages.table(sort_by=sort_by, row_limit=row_limit)


def profile_summary(fn: Callable[[], Any], device: torch.device, *, calls: int = 1,
                    row_limit: int = 25) -> str:
    """Top operators of ``calls`` calls of ``fn()`` by self time (torch.profiler's table)."""
    return top_operators_table(profile_operators(fn, device, calls=calls), device,
                               row_limit=row_limit)


def operator_calls(averages: Any) -> Dict[str, int]:
    """Operator name -> number of calls, from :func:`profile_operators`'s ``averages``."""
    return {event.key: int(event.count) for event in averages}


def call_count_differences(reference: Mapping[str, int], other: Mapping[str, int]
                           ) -> List[Tuple[str, int, int]]:
    """``(operator, calls in reference, calls in other)`` for every operator whose count
    differs, largest difference first: what one model runs that the other does not."""
    names = set(reference) | set(other)
    rows = [(name, reference.get(name, 0), other.get(name, 0)) for name in names
            if reference.get(name, 0) != other.get(name, 0)]
    return sorted(rows, key=lambda row: (-abs(row[2] - row[1]), row[0]))


# --------------------------------------------------------------------------------------------
# FLOPs


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Forward of softmax attention: ``Q K^T`` and ``A V`` (shapes ``[B, heads, L, D]``)."""
    batch, heads, queries, depth = query_shape
    keys, value_depth = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (depth + value_depth)


def _attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                              out_shape=None, **kwargs) -> int:
    """Backward of fused attention, as torch counts its CUDA kernels: the scores recomputed
    (``Q K^T``), then the gradients of ``A``, ``V``, ``Q`` and ``K`` (five matmuls)."""
    batch, heads, queries, depth = query_shape
    keys, value_depth = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (3 * depth + 2 * value_depth)


def _cpu_attention_flop_formulas() -> Dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU fused attention ops, which ``FlopCounterMode`` does not list.

    The non-local block calls ``scaled_dot_product_attention``; on the CPU that dispatches to
    ``_scaled_dot_product_flash_attention_for_cpu`` (and its backward), which torch's registry
    leaves out, so they would count as 0.
    """
    aten = torch.ops.aten
    formulas: Dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            _attention_backward_flops)
    return formulas


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one ``fn()`` as counted by ``FlopCounterMode`` (matmul/conv/attention only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flop_formulas())
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, *, size: int, repeats: int
) -> Dict[str, float]:
    """FLOP/s of a ``size x size`` matmul in ``dtype``: best of ``repeats`` after one warm-up.

    The best (not the median) estimates what the machine can do; 2 * size**3 FLOPs per matmul.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "seconds": best,
            "flops_per_second": 2.0 * size**3 / best}


# --------------------------------------------------------------------------------------------
# reporting


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# the scripts describe their environment after the runs; the load when they started is this
_LOADAVG_AT_IMPORT = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment_info(device: torch.device, args: argparse.Namespace) -> Dict[str, Any]:
    """Where and how the numbers were taken (recorded in every JSON file)."""
    import torchvision

    info: Dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "-m", _module_name()] + sys.argv[1:]),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "amp": bool(args.amp),
        "amp_dtype": str(autocast_dtype(device)).replace("torch.", "") if args.amp else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model_name(),
        "smoke": bool(args.smoke),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if _LOADAVG_AT_IMPORT is not None:
        info["loadavg_at_start"] = _LOADAVG_AT_IMPORT
    return info


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name
    return Path(sys.argv[0]).stem


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """Plain-text table. ``columns``: ``(key, header, format spec)``; missing values print "-"."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                line.append("-")
            else:
                line.append(format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    out = []
    for k, line in enumerate(cells):
        out.append("  ".join(text.rjust(w) if k and i else text.ljust(w)
                             for i, (text, w) in enumerate(zip(line, widths))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_results(name: str, device: torch.device, args: argparse.Namespace,
                  payload: Dict[str, Any]) -> Dict[str, Any]:
    """Write a script's ``payload`` to ``--out`` (default :func:`default_out_path`), say where,
    and return it."""
    out = write_json(args.out or default_out_path(name, device, args.amp), payload)
    print(f"wrote {out}")
    return payload


# an absolute POSIX path inside a string: a whole value, after "=" (an override) or a space (a
# command line); not the "/" of "1/9", "a / b" or a URL's "//"
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/[^\s=,;\"']+")


def relative_paths(value: Any, root: Path = REPO_ROOT) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every absolute path in its
    strings rewritten relative to ``root`` (the repository), so that a results file names the
    files of a run, not one machine's directories."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda m: os.path.relpath(m.group(0), root), value)
    if isinstance(value, Mapping):
        return {key: relative_paths(item, root) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(item, root) for item in value]
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as JSON, with the load average at the end in its ``environment`` and
    its paths relative to the repository (:func:`relative_paths`)."""
    if hasattr(os, "getloadavg"):
        payload = dict(payload)
        payload.setdefault("environment", {})["loadavg_at_end"] = [
            round(x, 2) for x in os.getloadavg()
        ]
    payload = relative_paths(payload)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
