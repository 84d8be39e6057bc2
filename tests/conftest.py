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
