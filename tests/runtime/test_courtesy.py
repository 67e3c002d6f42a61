"""Compiling a schema hands the GIL to the process's decoding loops: `pause` sleeps only while
another thread is marked busy, the compiling loops call it all along, decoding marks its thread,
and a thread that waits for the GIL beside a compile gets it back many times more often."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from runtime_refs import PROMPTS, tiny_model

from fastblt.runtime import courtesy, grammar
from fastblt.runtime.batch import BatchEngine
from fastblt.runtime.generator import Generator

COSTLY = {  # long compilations, through every loop of grammar.py, pattern.py and numbers.py that builds
    "bounds and a multiple": {"type": "integer", "minimum": -(10**6), "maximum": 10**9, "multipleOf": 397},
    "a pattern beside a format": {"type": "string", "format": "ipv6", "pattern": "^[0-9a-f:]*1[0-9a-f:]*$"},
    "a pattern held to lengths": {"type": "string", "pattern": "^([a-z]+-)*[a-z]$", "maxLength": 4000},
    "many properties": {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}},
}


class Sleeps:
    """Counts courtesy's hand-overs (its time.sleep calls) without sleeping."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.n = 0
        monkeypatch.setattr(courtesy.time, "sleep", self)

    def __call__(self, seconds: float) -> None:
        self.n += 1


def _fresh_compile(schema: dict) -> None:
    grammar.drop_caches()
    grammar.compile_schema({"type": "object", "properties": {"v": schema}, "required": ["v"]})


def test_pause_hands_over_only_while_another_thread_is_busy(monkeypatch):
    sleeps = Sleeps(monkeypatch)
    monkeypatch.setattr(courtesy, "GAP_S", 0.0)
    other = threading.get_ident() + 1  # a thread id that is not this one
    for _ in range(10):
        courtesy.pause()
    with courtesy.serving():  # only this thread busy: nobody to hand over to
        for _ in range(10):
            courtesy.pause()
    assert sleeps.n == 0 and not courtesy.others_busy()
    courtesy.busy(other)
    courtesy.busy(other)
    courtesy.idle(other)  # marks nest: still busy once
    try:
        assert courtesy.others_busy()
        for _ in range(10):
            courtesy.pause()
        assert sleeps.n == 10
        monkeypatch.setattr(courtesy, "GAP_S", float("inf"))  # at most once per GAP_S
        courtesy.pause()
        assert sleeps.n == 10
    finally:
        courtesy.idle(other)
    assert other not in courtesy._busy


@pytest.mark.parametrize("name", list(COSTLY))
def test_a_costly_compile_hands_over_all_along(name, monkeypatch):
    """With a hand-over at every pause, a long compilation runs at most a few thousand lines of
    Python between two (~1 ms; counted by a line tracer, not a clock), so no loop of it keeps the
    GIL long; unmarked it hands over never."""
    monkeypatch.setattr(courtesy, "GAP_S", 0.0)
    runs, lines = [], [0]

    def hand_over(seconds: float) -> None:
        runs.append(lines[0])
        lines[0] = 0

    def count(frame, event, arg):  # noqa: ANN001, ANN202  # sys.settrace's signature
        if event == "line":
            lines[0] += 1
        return count

    monkeypatch.setattr(courtesy.time, "sleep", hand_over)
    _fresh_compile(COSTLY[name])
    assert not runs  # nothing marked: no hand-over
    courtesy.busy(threading.get_ident() + 1)
    sys.settrace(count)
    try:
        _fresh_compile(COSTLY[name])
    finally:
        sys.settrace(None)
        courtesy.idle(threading.get_ident() + 1)
    runs.append(lines[0])
    assert sum(runs) > 50_000 and max(runs) < 8000, (sum(runs), len(runs), max(runs))


def test_decoding_marks_its_thread_while_it_runs():
    model = tiny_model("small-window")
    g = Generator(model, backend="torch")
    me = threading.get_ident()
    stream = g.stream(PROMPTS[0], mode="ar", max_bytes=40, stop_on_eos=False)
    next(stream)
    assert me in courtesy._busy  # a Generator's call, between its rounds
    for _ in stream:
        pass
    assert me not in courtesy._busy
    seen: list[bool] = []
    with BatchEngine(g.engine, max_batch=2) as batch:
        on_text = lambda text: seen.append(threading.get_ident() in courtesy._busy)  # noqa: E731  # the batch's thread
        batch.submit(g.request(PROMPTS[1], mode="blt-s", max_bytes=40), on_text=on_text).result(60)
    assert seen and all(seen)


def test_a_thread_waiting_for_the_gil_beside_a_compile_gets_it_back_far_more_often(monkeypatch):
    """This thread, marked busy, gives the GIL up (a 100 us sleep) and takes it back, over and over,
    while another thread compiles COSTLY schemas: with hand-overs it gets back many times more often
    than when the compile keeps the GIL for the interpreter's switch interval (5 ms)."""

    def rounds_beside_compiles(gap: float) -> float:
        monkeypatch.setattr(courtesy, "GAP_S", gap)
        stop, n = threading.Event(), 0

        def compiles() -> None:
            while not stop.is_set():
                _fresh_compile(COSTLY["bounds and a multiple"])

        worker = threading.Thread(target=compiles)
        with courtesy.serving():
            worker.start()
            time.sleep(0.05)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                time.sleep(1e-4)
                n += 1
            stop.set()
        worker.join()
        return n / (time.perf_counter() - t0)

    handing, keeping = rounds_beside_compiles(courtesy.GAP_S), rounds_beside_compiles(float("inf"))
    assert handing >= 4 * keeping, (handing, keeping)
