import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state on two CPU threads."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield
