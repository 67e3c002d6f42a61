"""CUDA graphs for the torch backend: replay a captured step call instead of launching its kernels.

A tiny model's step is a few hundred small kernels; eager PyTorch spends milliseconds launching
them from Python, the GPU microseconds running them. Step calls have static shapes (the caches
are static buffers), so a call can be captured once and replayed.

A graph reads fixed addresses. Its key is therefore the step, every feed's shape and dtype, and
the addresses of the persistent feeds (the caches and cross-attention buffers, which a
SequenceState allocates once and updates in place). The per-call feeds (ids, positions, byte
states, patch buffers) are copied into the graph's own static inputs before each replay.
Outputs are the graph's static outputs: valid until that graph's next replay, which the backend
contract (valid until the next call of the step) already implies.

Only calls of at most MAX_NEW positions are captured (decode, verification, diffusion blocks;
a prefill chunk is rarely repeated), and a key is captured on its WARM_CALLS-th call, so one-off
shapes never pay for a capture. At most MAX_GRAPHS graphs are kept (least recently used out).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastblt.export.spec import new_positions

WARM_CALLS = 2
MAX_GRAPHS = 256
MAX_NEW = 64
PERSISTENT = ("past.", "cross.")  # feed-name prefixes of buffers updated in place, bound by address

Feeds = dict[str, torch.Tensor]
Key = tuple


def is_persistent(name: str) -> bool:
    return name.startswith(PERSISTENT)


def graph_key(step: str, feeds: Feeds) -> Key:
    """What a captured graph depends on: shapes and dtypes of all feeds, addresses of persistent ones."""
    return (step,) + tuple(
        (name, tuple(x.shape), x.dtype, x.data_ptr() if is_persistent(name) else 0) for name, x in sorted(feeds.items())
    )


class GraphCache:
    """Which keys have a graph, which are still warming up, and LRU eviction.

    `capture(feeds)` makes a replayable callable for one key; it is injected so that the policy
    is tested without a GPU.
    """

    def __init__(self, warm_calls: int = WARM_CALLS, max_graphs: int = MAX_GRAPHS, max_new: int = MAX_NEW):
        self.warm_calls, self.max_graphs, self.max_new = warm_calls, max_graphs, max_new
        self.graphs: OrderedDict[Key, Callable[[Feeds], Feeds]] = OrderedDict()
        self.seen: dict[Key, int] = {}
        self.captures = self.replays = self.evictions = 0

    def lookup(self, step: str, feeds: Feeds, capture: Callable[[Feeds], Callable[[Feeds], Feeds]]):
        """The graph to replay for this call, or None (run it eagerly)."""
        if new_positions(feeds) > self.max_new:
            return None
        key = graph_key(step, feeds)
        graph = self.graphs.get(key)
        if graph is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] < self.warm_calls:
                return None
            graph = capture(feeds)
            self.captures += 1
            del self.seen[key]
            self.graphs[key] = graph
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
                self.evictions += 1
        else:
            self.graphs.move_to_end(key)
        self.replays += 1
        return graph

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()


@dataclass
class CapturedStep:
    """One captured call: static per-call inputs, the graph, static outputs."""

    graph: torch.cuda.CUDAGraph
    inputs: Feeds  # the per-call feeds' static copies
    outputs: Feeds

    def __call__(self, feeds: Feeds) -> Feeds:
        for name, static in self.inputs.items():
            static.copy_(feeds[name], non_blocking=True)
        self.graph.replay()
        return self.outputs


def capture_step(fn: Callable[[Feeds], Feeds], feeds: Feeds, device: torch.device) -> CapturedStep:
    """Capture fn(feeds) on `device`: persistent feeds by address, per-call feeds as static copies.

    One warm-up call on a side stream first (allocator and cuBLAS workspaces are set up outside
    the capture, as torch.cuda.graph's documentation prescribes).
    """
    inputs = {name: x.clone() for name, x in feeds.items() if not is_persistent(name)}
    static = {name: inputs.get(name, x) for name, x in feeds.items()}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        fn(static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        outputs = fn(static)
    return CapturedStep(graph, inputs, outputs)
