"""Ahead-of-time compile of every Triton kernel for real GPU architectures, on a machine without a GPU.

    python bench/triton_aot.py --arch 80,90 [--launches FILE] [--record-only FILE] [--jobs N]

A GPU compiles each kernel once per specialization: the constexpr arguments, the dtypes of the
pointer arguments, whether each pointer is 16-byte aligned, and whether each int argument is 1
(a constant then) or a multiple of 16. The CPU interpreter that runs the tests compiles nothing,
so a kernel that Triton cannot compile for some specialization passes CI and fails on the GPU.

1. Record: the kernel tests (tests/kernels) run under TRITON_INTERPRET=1 in a subprocess that
   writes the arguments and launch options of every kernel launch, abstracted to what the
   specialization depends on (tensor dtype and alignment, ints and floats by value).
2. Variants: every recorded launch, and the same launch with each int argument set to 1.
3. Compile: each distinct specialization (Triton's own binder computes the key, as at a launch)
   through Triton's full pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin via ptxas) for every
   requested architecture, in parallel.

Exit status 0 only if every compile succeeded; the failures are listed with the compiler's
message. Run it with the Triton of the GPU machine too (a side environment whose triton package
comes first on PYTHONPATH, as .ci/run does).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ---- 1. record (runs with TRITON_INTERPRET=1) -------------------------------------------------
def _abstract(x):
    """What a launch argument's specialization depends on, as JSON."""
    import torch

    if isinstance(x, torch.Tensor):
        return {"tensor": str(x.dtype).removeprefix("torch."), "aligned": x.data_ptr() % 16 == 0}
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return {"value": x}
    if isinstance(x, int):
        return {"int": x}
    if isinstance(x, float):
        return {"float": x}
    raise TypeError(f"triton_aot: cannot record a launch argument of type {type(x).__name__}")


def record(out: Path) -> None:
    """Run the kernel tests, recording every launch of an eagle2_kernels.triton kernel; write the
    distinct launches to `out`. The interpreter's launch is wrapped (in this process only): its
    pre-run hooks never see the launch options (num_warps, num_stages), which a compile needs."""
    import pytest
    from triton.runtime.interpreter import InterpretedFunction

    launches = set()
    launch = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if self.fn.__module__.startswith("eagle2_kernels.triton."):
            launches.add(json.dumps({"kernel": f"{self.fn.__module__}:{self.fn.__name__}",
                                     "args": [_abstract(a) for a in args],
                                     "kwargs": {k: _abstract(v) for k, v in sorted(kwargs.items())}}))
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    status = pytest.main(["-q", "-p", "no:cacheprovider", "-x", str(REPO / "tests" / "kernels")])
    if status != 0:
        sys.exit(f"triton_aot: the kernel tests failed (pytest exit {status}); nothing recorded")
    out.write_text("\n".join(sorted(launches)) + "\n")
    print(f"[triton_aot] recorded {len(launches)} distinct launches", file=sys.stderr, flush=True)


# ---- 2./3. variants and compile (runs without the interpreter) ---------------------------------
def _concrete(a):
    """A launch argument that specialises like the recorded one."""
    import torch

    if a is None:
        return None
    if "tensor" in a:
        dtype = getattr(torch, a["tensor"])
        base = torch.empty(16, dtype=dtype)  # the allocator aligns to 64 bytes
        return base if a["aligned"] else base[1:]  # one element in: not 16-byte aligned
    return a.get("int", a.get("float", a.get("value")))


def variants(launch: dict) -> list[dict]:
    """The launch, and the launch with each of its int arguments set to 1."""
    out = [launch]
    for i, a in enumerate(launch["args"]):
        if a is not None and "int" in a and a["int"] != 1:
            out.append({**launch, "args": [*launch["args"][:i], {"int": 1}, *launch["args"][i + 1:]],
                        "variant": f"arg {i} = 1"})
    return out


def _binder_key(kernel, backend, args, kwargs):
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return bound, specialization, options


def compile_one(job: tuple[str, str, int]) -> tuple[str, int, float, str | None]:
    """Compile one (kernel, launch, arch); returns (kernel, arch, seconds, error or None)."""
    key, launch_json, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    launch = json.loads(launch_json)
    mod_name, name = key.split(":")
    kernel = getattr(importlib.import_module(mod_name), name)
    args = [_concrete(a) for a in launch["args"]]
    kwargs = {k: _concrete(v) for k, v in launch["kwargs"].items()}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    start = time.perf_counter()
    try:
        bound, specialization, options = _binder_key(kernel, backend, args, kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
        return key, arch, time.perf_counter() - start, None
    except Exception as e:  # noqa: BLE001 - every compiler failure is reported, not raised
        lines = traceback.format_exception_only(type(e), e)
        return key, arch, time.perf_counter() - start, "".join(lines).strip()[-2000:]


def distinct_jobs(launches: list[dict], archs: list[int]) -> list[tuple[str, str, int]]:
    """One job per (kernel, specialization as Triton's binder keys it, options, arch)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    seen, jobs = set(), []
    for arch in archs:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        for launch in (v for la in launches for v in variants(la)):
            mod_name, name = launch["kernel"].split(":")
            kernel = getattr(importlib.import_module(mod_name), name)
            args = [_concrete(a) for a in launch["args"]]
            kwargs = {k: _concrete(v) for k, v in launch["kwargs"].items()}
            _, specialization, options = _binder_key(kernel, backend, args, kwargs)
            ident = (launch["kernel"], arch, str(specialization), str(sorted(kwargs.items())), str(options))
            if ident not in seen:
                seen.add(ident)
                jobs.append((launch["kernel"], json.dumps(launch), arch))
    return jobs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--launches", type=Path, help="use this recording instead of running the kernel tests")
    p.add_argument("--record-only", type=Path, metavar="FILE", help="record the launches into FILE and stop")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    args = p.parse_args()
    if args.record_only:
        os.environ["TRITON_INTERPRET"] = "1"
        record(args.record_only)
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_aot: unset TRITON_INTERPRET for the compile step (the recording sets it itself)")
    archs = [int(a) for a in args.arch.split(",")]
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        launches_file = args.launches
        if launches_file is None:
            launches_file = Path(tmp) / "launches.jsonl"
            env = {**os.environ, "TRITON_INTERPRET": "1"}
            subprocess.run([sys.executable, __file__, "--record-only", str(launches_file)], env=env, check=True)
        launches = [json.loads(line) for line in launches_file.read_text().splitlines() if line.strip()]
    jobs = distinct_jobs(launches, archs)
    print(f"[triton_aot] triton {triton.__version__}: {len(launches)} launches -> {len(jobs)} distinct compiles "
          f"for sm_{', sm_'.join(map(str, archs))} on {args.jobs} processes", file=sys.stderr, flush=True)
    start, failures, per_kernel = time.perf_counter(), [], {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for done, (key, arch, seconds, error) in enumerate(pool.map(compile_one, jobs), 1):
            n, total = per_kernel.get((key, arch), (0, 0.0))
            per_kernel[(key, arch)] = (n + 1, total + seconds)
            if error is not None:
                failures.append((key, arch, jobs[done - 1][1], error))
            if done % 10 == 0 or done == len(jobs):
                print(f"[triton_aot] {done}/{len(jobs)} compiled, {len(failures)} failed "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    for (key, arch), (n, total) in sorted(per_kernel.items()):
        print(f"{key.split(':')[1]:<28} sm_{arch}  {n:3d} specializations  {total:7.1f} s")
    for key, arch, launch, error in failures:
        print(f"\nFAILED {key} sm_{arch}: {launch}\n{error}")
    print(f"triton {triton.__version__}: {len(jobs) - len(failures)} compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
