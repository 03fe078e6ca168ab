"""Test-session setup, loaded by pytest before any test module.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter; the variable must
be set before anything imports triton, which is why it lives here.

The suite never writes into the user's eagle2 cache (models, autotune measurements): it runs
with EAGLE2_CACHE in a temporary folder. A default target the user's cache already holds is
linked in (read-only use), so a developer's run does not materialise it again; CI starts empty.
"""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _private_cache() -> None:
    from eagle2.model import DEFAULT_TARGET_NAME, cache_dir

    user = cache_dir() / DEFAULT_TARGET_NAME
    private = Path(tempfile.mkdtemp(prefix="eagle2-test-cache-"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    if user.is_dir():
        (private / DEFAULT_TARGET_NAME).symlink_to(user, target_is_directory=True)
    os.environ["EAGLE2_CACHE"] = str(private)


_private_cache()

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
