"""The installation itself: native modules built, backend status honest, package data shipped."""
import importlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

import eagle2_kernels
from eagle2_kernels import _backend

OPS = eagle2_kernels.OPS
REPO = Path(__file__).resolve().parents[1]


def test_cpu_module_is_built():
    c = importlib.import_module("eagle2_kernels._C")
    cpu_ops = [op for op in OPS if "cpu" in eagle2_kernels.IMPLEMENTATIONS[op]]
    assert cpu_ops == list(OPS) and all(callable(getattr(c, op, None)) for op in cpu_ops), f"_C lacks some of {OPS}: {dir(c)}"
    assert eagle2_kernels.backends()["cpu"] == "available"


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("EAGLE2_NO_CUDA") == "1",
                    reason="the CUDA module is built only where nvcc is found")
def test_cuda_module_is_built_when_nvcc_exists():
    g = importlib.import_module("eagle2_kernels._cuda")
    cuda_ops = [op for op in OPS if "cuda" in eagle2_kernels.IMPLEMENTATIONS[op]]
    assert all(callable(getattr(g, op, None)) for op in cuda_ops), f"_cuda lacks some of {cuda_ops}: {dir(g)}"
    # Static cudart: the module loads without a driver and counts what torch counts.
    assert g.device_count() == torch.cuda.device_count()


def test_backends_lists_every_name_with_a_status():
    status = eagle2_kernels.backends()
    assert tuple(status) == ("reference", "cpu", "cuda", "triton")
    assert status["reference"] == "available"
    assert all(isinstance(v, str) and v for v in status.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the status reported without a GPU")
def test_cuda_status_explains_why_without_a_gpu():
    why = eagle2_kernels.backends()["cuda"]
    built = importlib.util.find_spec("eagle2_kernels._cuda") is not None
    assert ("no CUDA device" if built else "not importable") in why, why


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    """Without a GPU the backend is unavailable, with one the tensors are on the wrong device:
    either way a Python exception naming the backend, never a native crash."""
    cache = torch.zeros(1, 1, 4, 2)
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises((RuntimeError, ValueError), match="'cuda'"):
        eagle2_kernels.kv_compact(cache, one, torch.zeros(1, 1, dtype=torch.int32), one, backend="cuda")
    with pytest.raises((RuntimeError, ValueError), match="'cuda'"):
        eagle2_kernels.rerank(torch.zeros(1, 3), torch.full((1, 3), -1, dtype=torch.int32),
                              torch.zeros(1, 3, dtype=torch.int32), one, one, 2, backend="cuda")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve("rerank", torch.device("cpu"), "metal")
    with pytest.raises(ValueError, match="rerank has no 'triton' implementation"):
        eagle2_kernels.rerank(torch.zeros(1, 3), torch.full((1, 3), -1, dtype=torch.int32),
                              torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                              torch.ones(1, dtype=torch.int32), 2, backend="triton")


def test_draft_head_files_are_installed():
    """Every file under python/eagle2/heads in the source tree is in the installed package."""
    eagle2 = pytest.importorskip("eagle2")
    src = REPO / "python" / "eagle2" / "heads"
    installed = Path(eagle2.__file__).parent / "heads"
    shipped = {".safetensors", ".json", ".md"}

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in shipped} if root.is_dir() else set()

    assert files(src) <= files(installed), f"missing from {installed}: {files(src) - files(installed)}"
