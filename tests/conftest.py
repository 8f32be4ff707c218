import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("adapters")
