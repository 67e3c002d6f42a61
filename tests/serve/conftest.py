import pytest

from fastblt.serve.process import ServerProcess

KEY = "test-key"
# a chat template as Hugging Face tokenizers keep them: a code model's turns as a session transcript
CHAT_TEMPLATE = """\
{% if tools %}
# tools: {{ tools | map(attribute='function') | map(attribute='name') | join(', ') }}
{% endif %}
{% for m in messages %}
{% if m.role == 'system' and not loop.first %}{{ raise_exception('a system message comes first') }}{% endif %}
{% if m.role in ('system', 'developer') %}# {{ m.content }}
{% elif m.role == 'user' %}>>> {{ m.content }}
{% elif m.role == 'tool' %}# {{ m.tool_call_id }} -> {{ m.content }}
{% elif m.tool_calls %}{{ {'tool_calls': m.tool_calls | map(attribute='function') | list} | tojson }}
{% else %}{{ m.content }}
{% endif %}
{% endfor %}
"""
CHAT_STOP = "\n>>> "  # the next user turn in that transcript: where the assistant's turn ends


@pytest.fixture(scope="session")
def chat_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "transcript.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="session")
def server(chat_template):
    """The embedded default behind `fastblt serve`, as a user starts it (plus a key, a queue long
    enough for 64 concurrent requests, a chat template with its turns' end, and the request log)."""
    args = ["--max-batch", "16", "--max-queue", "64", "--api-key", KEY, "--chat-template", str(chat_template),
            "--chat-stop", CHAT_STOP, "--log-level", "info"]  # fmt: skip
    with ServerProcess(args) as srv:
        yield srv


@pytest.fixture(scope="session")
def reference():
    from fastblt.runtime.generator import Generator

    return Generator("default")


@pytest.fixture(scope="module")
def engine_here():
    """A small engine in this process (one lane of 4 rows, a thread), for apps a test calls in
    process (httpx.ASGITransport)."""
    from fastblt.runtime.async_engine import AsyncEngine

    eng = AsyncEngine("default", max_batch=4, lanes=1, processes=False)
    yield eng
    eng.close()
