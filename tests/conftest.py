"""Test-session setup, loaded by pytest before any test module.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter; the variable must
be set before anything imports triton, which is why it lives here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# Fresh random examples each run (derandomize=False) but bounded so the whole suite, with the
# slow Triton interpreter, stays within the CI budget on 2 cores. Override per test with
# @settings(max_examples=...) or select another profile with --hypothesis-profile.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=False,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    """Which eagle2_kernels is under test (installed vs source tree) and what it can run."""
    import eagle2_kernels

    status = ", ".join(f"{k}: {v}" for k, v in eagle2_kernels.backends().items())
    return [f"eagle2_kernels: {eagle2_kernels.__file__}", f"backends: {status}"]
