"""Shared test setup: the embedded data set is generated once per session into a temp cache."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cli.py does; must precede the torch import

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["CNNBENCH_CACHE"] = str(tmp_path_factory.mktemp("cnnbench-cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`python -m cnnbench demo --quick` run once in a fresh working folder holding the user's own packages
    named like ours: (that folder, the --json summary).

    Shared by the demo's tests and the README's command sequence, which continues in the same folder as
    after the README's full demo: hence --out runs/demo, not --quick's own default (runs/demo-quick).
    """
    import json
    import subprocess
    import sys

    from test_package import make_user_packages

    workdir = tmp_path_factory.mktemp("project")
    make_user_packages(workdir)  # the user's own data/, models/, ...: `python -m` puts this folder first on sys.path
    done = subprocess.run([sys.executable, "-m", "cnnbench", "demo", "--quick", "--out", "runs/demo", "--json"], cwd=workdir,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, json.loads(done.stdout)


@pytest.fixture
def one_intra_op_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP threads waiting on a descheduled peer turn a
    millisecond forward into a hundred or more, which no latency bound or timing survives."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
