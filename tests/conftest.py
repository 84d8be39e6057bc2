"""Shared test setup: the embedded data set is generated once per session into a temp cache."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["CNNBENCH_CACHE"] = str(tmp_path_factory.mktemp("cnnbench-cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
