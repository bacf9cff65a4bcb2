import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Tensorflow dtype mappings.*")
os.environ.setdefault("ODMT_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "odmt-features"))


@pytest.fixture(scope="module")
def one_torch_thread():
    # tiny tensors: a second OpenMP thread only adds waiting, badly so on a busy 2-core machine
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
