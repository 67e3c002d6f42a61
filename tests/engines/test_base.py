"""Backend's lifecycle: a lazy activation raced by several threads happens once."""

from __future__ import annotations

import threading
import time

from fastblt.engines.base import Backend
from fastblt.export.spec import step_specs

from tiny import make_model


class Slow(Backend):
    """A backend whose activation takes long enough for other threads' first calls to arrive."""

    def __init__(self, specs):
        super().__init__(specs)
        self.activations = 0
        self.ran_inactive = 0

    def _activate_impl(self) -> None:
        self.activations += 1
        time.sleep(0.05)

    def _run_step_impl(self, step, feeds):
        self.ran_inactive += not self.active
        return {}

    def _deactivate_impl(self) -> None:
        self.activations -= 1


def test_first_calls_from_many_threads_activate_once():
    """Eight threads' first step calls arrive while one of them activates: activation runs once,
    and no call runs before it finished (a serving engine's lanes start this way)."""
    backend = Slow(step_specs(make_model().config, max_step=4))
    start = threading.Barrier(8)

    def first_call() -> None:
        start.wait()
        backend.run_step("entropy", {}, check=False)

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert backend.activations == 1 and backend.ran_inactive == 0 and backend.active
    with backend:  # entering an active backend activates nothing more; leaving deactivates it
        assert backend.activations == 1
    assert backend.activations == 0 and not backend.active
