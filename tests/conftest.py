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
    """`python cli.py demo --quick` run once in a fresh working folder: (that folder, the --json summary).

    Shared by the demo's tests and the README's command sequence, which continues in the same folder.
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    workdir = tmp_path_factory.mktemp("project")
    cli = Path(__file__).resolve().parents[1] / "cli.py"
    done = subprocess.run([sys.executable, str(cli), "demo", "--quick", "--json"], cwd=workdir,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return workdir, json.loads(done.stdout)
