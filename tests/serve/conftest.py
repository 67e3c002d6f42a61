import pytest

from fastblt.serve.process import ServerProcess

KEY = "test-key"


@pytest.fixture(scope="session")
def server():
    """The embedded default behind `fastblt serve`, as a user starts it (plus a key and a queue
    long enough for 64 concurrent requests)."""
    with ServerProcess(["--max-batch", "16", "--max-queue", "64", "--api-key", KEY]) as srv:
        yield srv


@pytest.fixture(scope="session")
def reference():
    from fastblt.runtime.generator import Generator

    return Generator("default")
