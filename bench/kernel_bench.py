"""Kernel microbenchmarks: every backend of every op against the PyTorch reference.

    python bench/kernel_bench.py [--device cpu|cuda] [--ops frontier_expand,rerank,...] [--quick]
                            [--iters N] [--json OUT]

Each op's cases come from bench/bench_<op>.py (`cases(device, quick) -> list[Case]`, see
bench/_harness.py). Prints one row per (case, implementation): median ms, speedup over
"reference" in the same run, GB/s where the case gives bytes_moved, and on CUDA that rate as a
percentage of the card's copy bandwidth measured at start. Exits non-zero if a bench module
is missing or an implementation raised.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
import traceback
from pathlib import Path

import torch

from _harness import time_ms
from eagle2_kernels import OPS, device_name


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def copy_bandwidth_gbs(device: torch.device, iters: int) -> float:
    """Device-to-device copy rate (bytes read + written per second), the ceiling for GB/s."""
    src = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB: far past L2
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, iters=iters)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    iters = args.iters or (3 if args.quick else 100 if device.type == "cuda" else 10)
    warmup = 1 if args.quick else 5
    header = {
        "machine": device_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "iters": iters,
        "quick": args.quick,
    }
    if device.type == "cuda":
        header["copy_gbs"] = round(copy_bandwidth_gbs(device, iters), 1)
    print("  ".join(f"{k}={v}" for k, v in header.items()))

    problems = []
    cases = []
    for op in args.ops:
        try:
            mod = importlib.import_module(f"bench_{op}")
        except ModuleNotFoundError as e:
            if e.name != f"bench_{op}":
                raise
            problems.append(f"missing bench/bench_{op}.py")
            print(problems[-1])
            continue
        cases += mod.cases(device, args.quick)

    rows = []

    def save() -> None:  # after every case, so a run cut short by a timeout keeps what it measured
        if args.json:
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"header": header, "rows": rows, "problems": problems}, indent=1) + "\n")
            tmp.replace(out)

    fmt = "{:<16} {:<34} {:<10} {:>11} {:>9} {:>9} {:>7}"
    print(fmt.format("op", "shape", "impl", "median ms", "speedup", "GB/s", "% copy"))
    for case in cases:
        times = {}
        for impl, fn in case.fns.items():
            try:
                times[impl] = time_ms(fn, device, warmup=warmup, iters=iters)
            except Exception:
                problems.append(f"{case.op} [{case.shape}] {impl} raised:\n{traceback.format_exc()}")
        ref = times.get("reference")
        for impl in case.fns:
            ms = times.get(impl)
            if ms is None:
                print(fmt.format(case.op, case.shape, impl, "error", "", "", ""))
                continue
            gbs = case.bytes_moved / (ms * 1e-3) / 1e9 if case.bytes_moved else None
            pct = 100 * gbs / header["copy_gbs"] if gbs is not None and "copy_gbs" in header else None
            row = {"op": case.op, "shape": case.shape, "impl": impl, "ms": ms,
                   "speedup": ref / ms if ref else None, "gbs": gbs, "pct_copy": pct}
            rows.append(row)
            print(fmt.format(case.op, case.shape, impl, f"{ms:.4f}",
                             "" if row["speedup"] is None else f"{row['speedup']:.2f}x",
                             "" if gbs is None else f"{gbs:.1f}" if gbs >= 1 else f"{gbs:.3f}", "" if pct is None else f"{pct:.0f}%"),
                  flush=True)
        save()

    save()
    if args.json:
        print(f"wrote {args.json}")
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--quick", action="store_true", help="small shapes and few iterations (a smoke test)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per implementation (median)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write header + rows as JSON")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        p.error(f"--ops: unknown {unknown}; choose from {OPS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
