"""The thread governor of the decode loop (eagle2.threads): fewer threads while other processes
keep cores busy, the caller's setting back afterwards."""
import subprocess
import sys
import time

import pytest
import torch

from eagle2.threads import ThreadGovernor, other_runnable, threads_for


def test_threads_for_leaves_the_busy_cores_to_their_owners():
    assert threads_for([], cores=8, limit=4) == 4
    assert threads_for([0, 0, 5], cores=8, limit=4) == 4  # a blip: the median ignores it
    assert threads_for([5, 6, 5], cores=8, limit=4) == 3
    assert threads_for([9, 9, 9], cores=8, limit=4) == 1  # never below one
    assert threads_for([1], cores=2, limit=2) == 1


@pytest.mark.skipif(other_runnable() is None, reason="needs Linux /proc (the governor is inactive elsewhere)")
def test_governor_yields_to_competing_processes_and_restores_threads():
    """Two busy competitors on this machine leave a step fewer threads than the caller's (one on
    the 2-core CI machine); leaving the block restores torch's thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    spin = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(torch.get_num_threads())]
    try:
        time.sleep(0.5)  # the competitors are running
        with ThreadGovernor(torch.device("cpu")) as governor:
            if not governor.active:
                pytest.skip("the process runs on a subset of the machine's cores")
            chosen = [governor.step() for _ in range(5)]
            assert chosen[-1] == torch.get_num_threads() <= max(1, governor.cores - 2)
        assert torch.get_num_threads() == 2
    finally:
        for p in procs:
            p.kill()
            p.wait()
        torch.set_num_threads(saved)
