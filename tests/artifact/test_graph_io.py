"""The host-feed → graph-input rule (``artifact/graph_io.py``): per-layer inputs are views of the stacked
feeds, ``logit_rows`` defaults to every prompt row, and generation asks for the last row only."""
from __future__ import annotations

import pytest
import torch

from mplus_deploy.artifact import graph_io


def test_layered_inputs_are_views_of_the_stack():
    g = torch.Generator().manual_seed(0)
    feeds = {"ltm_k": torch.randn(3, 2, 50, 4, generator=g), "ltm_keys": torch.randn(3, 50, 8, generator=g),
             "ltm_v": torch.randn(3, 2, 50, 4, generator=g), "ids": torch.arange(6)}
    for name in graph_io.layered_names(3):
        base, l = name.rsplit(".", 1)
        v = graph_io.resolve(feeds, name)
        assert torch.equal(v, feeds[base][int(l)])
        assert v.data_ptr() == feeds[base][int(l)].data_ptr() and v.is_contiguous()  # no copy
    assert graph_io.layered_names(2) == ["ltm_keys.0", "ltm_k.0", "ltm_v.0", "ltm_keys.1", "ltm_k.1", "ltm_v.1"]


def test_logit_rows_default_and_generation():
    ids = torch.tensor([5, 9, 2, 7])
    assert torch.equal(graph_io.resolve({"ids": ids}, "logit_rows"), torch.arange(4))
    assert torch.equal(graph_io.resolve({"ids": ids, "logit_rows": torch.tensor([3])}, "logit_rows"), torch.tensor([3]))
    assert graph_io.last_row(ids).tolist() == [3]


def test_missing_input_is_named():
    with pytest.raises(KeyError, match="ltm_k.0"):
        graph_io.resolve({"ids": torch.arange(3)}, "ltm_k.0")
    with pytest.raises(KeyError, match="past_k.1"):
        graph_io.resolve({"past_k": torch.zeros(2, 1)}, "past_k.1")  # only the LTM inputs are layered
