"""CUDA-graph capture of one draft + verify step of the five ops (bench/gpu_check.sh runs it).

    python bench/gpu_capture.py            on a GPU: the cuda and triton backends
    python bench/gpu_capture.py --dry-run  on a CPU: the same step, eager, on the cpu backend

The step is tests/kernels/test_compile.py's decode_step (frontier_expand, rerank,
tree_attention, tree_verify, kv_compact). For each backend it runs the step eagerly, captures it
in a torch.cuda.CUDAGraph with torch.cuda.set_sync_debug_mode("error") (an op that synchronised
with the host would raise), replays the graph on fresh copies of the inputs, and checks that the
replay gives exactly what eager gave, the compacted cache included. Exit status 0 if all match.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from test_compile import decode_step, step_inputs  # noqa: E402

B, M, PREFIX = 4, 12, 300


def flat(outputs) -> list[torch.Tensor]:
    return [t for o in outputs for t in (o if isinstance(o, tuple) else (o,))]


def check_backend(backend: str, dev: torch.device) -> list[str]:
    """Mismatches between eager and the replayed graph (empty when they agree)."""
    inputs = {k: v.to(dev) for k, v in step_inputs(B, M, PREFIX, seed=0).items()}
    copy = lambda: {k: v.clone() for k, v in inputs.items()}  # noqa: E731
    eager_in = copy()
    torch.cuda.set_sync_debug_mode("error")
    try:
        want = flat(decode_step(**eager_in, m=M, backend=backend))  # also compiles the Triton kernels
        side = torch.cuda.Stream()  # capture needs a warm-up on a side stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode_step(**copy(), m=M, backend=backend)
        torch.cuda.current_stream().wait_stream(side)
        static = copy()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = flat(decode_step(**static, m=M, backend=backend))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for k, v in inputs.items():
        static[k].copy_(v)  # the capture ran the step once: start the replay from the inputs again
    graph.replay()
    torch.cuda.synchronize()
    bad = [f"{backend}: output {i} differs" for i, (g, w) in enumerate(zip(got, want)) if not torch.equal(g, w)]
    if not torch.equal(static["cache"], eager_in["cache"]):
        bad.append(f"{backend}: the compacted cache differs")
    return bad


def main(argv: list[str]) -> int:
    if "--dry-run" in argv:
        decode_step(**step_inputs(B, M, PREFIX, seed=0), m=M, backend="cpu")
        print("gpu_capture --dry-run: the step runs eagerly on the cpu backend")
        return 0
    if not torch.cuda.is_available():
        sys.exit("gpu_capture: no CUDA device (use --dry-run on a CPU)")
    dev = torch.device("cuda")
    bad = []
    for backend in ("cuda", "triton"):
        try:
            problems = check_backend(backend, dev)
        except Exception as e:  # noqa: BLE001 - reported per backend, the other still runs
            problems = [f"{backend}: {type(e).__name__}: {e}"]
        bad += problems
        print(f"{backend}: {'graph replay == eager, no host sync' if not problems else '; '.join(problems)}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
