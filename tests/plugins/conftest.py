import torch
import pytest


def make_case(seed: int, T: int = 16, S: int = 600, D: int = 16, n_unique: int = 150, n_ages: int = 4):
    """Inputs whose q·k products are exact in fp32 (multiples of 1/64), keys drawn with replacement from
    ``n_unique`` rows (so many exactly duplicated keys → exact score ties) and few distinct ages."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-4, 5, (T, D), generator=g).float() / 8
    uniq = torch.randint(-4, 5, (n_unique, D), generator=g).float() / 8
    keys = uniq[torch.randint(0, n_unique, (S,), generator=g)].contiguous()
    ages = torch.randint(0, n_ages, (S,), generator=g, dtype=torch.int64)
    return q, keys, ages


@pytest.fixture
def case():
    return make_case
