"""CUDA graphs for the torch backend: the capture policy here, the real thing with `-m gpu`."""

from __future__ import annotations

import pytest
import torch

from fastblt.engines.cuda_graphs import GraphCache, graph_key
from fastblt.engines.torch_backend import TorchBackend
from fastblt.errors import InputError
from fastblt.export.spec import step_specs

from tiny import make_model


def feeds(S: int, cache: torch.Tensor, start: int = 0) -> dict[str, torch.Tensor]:
    return {"tokens": torch.zeros(1, S, dtype=torch.int32), "start": torch.tensor([start]), "past.0.k": cache}


class Captures:
    def __init__(self):
        self.keys = []

    def __call__(self, f):
        self.keys.append(graph_key("entropy", f))
        return lambda _: {"captured": len(self.keys)}


def test_a_key_is_captured_on_its_second_call_and_then_replayed():
    cache, capture, graphs = torch.zeros(4), Captures(), GraphCache(warm_calls=2)
    assert graphs.lookup("entropy", feeds(1, cache), capture) is None  # first call: eager
    assert graphs.lookup("entropy", feeds(1, cache, start=5), capture) is not None  # values do not matter
    assert graphs.lookup("entropy", feeds(1, cache, start=6), capture) is not None
    assert (graphs.captures, graphs.replays) == (1, 2)


def test_the_key_holds_shapes_and_persistent_addresses_only():
    a, b = torch.zeros(4), torch.zeros(4)
    assert graph_key("entropy", feeds(1, a, 0)) == graph_key("entropy", feeds(1, a, 9))
    assert graph_key("entropy", feeds(1, a)) != graph_key("entropy", feeds(2, a))  # shape
    assert graph_key("entropy", feeds(1, a)) != graph_key("entropy", feeds(1, b))  # another state's cache
    assert graph_key("entropy", feeds(1, a)) != graph_key("encoder", feeds(1, a))


def test_large_calls_stay_eager_and_the_oldest_graph_goes_first():
    cache, capture = torch.zeros(4), Captures()
    graphs = GraphCache(warm_calls=1, max_graphs=2, max_new=8)
    assert graphs.lookup("entropy", feeds(9, cache), capture) is None and graphs.captures == 0
    for S in (1, 2, 1, 3):  # 1 is used again before 3 arrives: 2 is the least recently used
        graphs.lookup("entropy", feeds(S, cache), capture)
    assert graphs.evictions == 1
    assert graph_key("entropy", feeds(2, cache)) not in graphs.graphs
    assert graph_key("entropy", feeds(1, cache)) in graphs.graphs


def test_cuda_graphs_need_a_cuda_device():
    model = make_model()
    specs = step_specs(model.config, 16, 16)
    assert TorchBackend(specs, model).graphs is None  # off on the CPU by default
    with pytest.raises(InputError, match="cuda_graphs: the torch backend runs on cpu"):
        TorchBackend(specs, model, cuda_graphs=True)
