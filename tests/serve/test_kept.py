"""Where kept responses and conversations live (serve/kept.py): in memory or in a SQLite file,
the same least-recently-used map bounded by bytes; the file is read again by the next server (a
restarted `fastblt serve --response-store-dir` continues the responses and conversations the last
one kept), and a file that is no store of ours is refused by name, never overwritten. One server
holds a directory at a time."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import openai
import pytest
from conftest import CHAT_STOP, KEY

from fastblt.serve.kept import FILE, FileKept, MemoryKept, check_dir, open_kept, size_of
from fastblt.serve.process import ServerProcess

VALUE = {"text": "x" * 100}
SIZE = size_of(VALUE)


@pytest.fixture(params=["memory", "file"])
def kept(request, tmp_path):
    def make(budget: int):
        return MemoryKept(budget) if request.param == "memory" else FileKept(tmp_path / FILE, "t", budget)

    return make


def test_the_least_recently_used_go_past_the_budget(kept):
    k = kept(3 * SIZE)
    for key in "abc":
        assert k.put(key, VALUE)
    assert k.get("a") == VALUE  # used: b is now the least recently used
    assert k.put("d", VALUE) and k.get("b") is None and k.get("a") == VALUE and k.used == 3 * SIZE
    assert k.put("a", {"text": "y"}) and k.get("a") == {"text": "y"} and k.used == 2 * SIZE + size_of({"text": "y"})
    assert not k.put("e", {"text": "x" * (3 * SIZE)}) and k.get("e") is None  # alone past the budget
    assert k.delete("a") and not k.delete("a") and k.get("a") is None


def test_a_change_that_no_longer_fits_drops_the_value_instead_of_claiming_it_kept(kept):
    k = kept(3 * SIZE)
    assert k.put("a", VALUE) and k.update("a", lambda v: {"text": v["text"] + "y"})["text"].endswith("y")
    assert k.update("a", lambda v: {"text": "x" * (3 * SIZE)}) is None  # alone past the budget
    assert k.get("a") is None and k.used == 0  # not the value before the change either: gone


def test_a_file_is_read_again_in_its_order_of_use_and_a_smaller_budget_evicts(tmp_path):
    path = tmp_path / FILE
    k = FileKept(path, "t", 10 * SIZE)
    for key in "abcd":
        k.put(key, {**VALUE, "key": key})
    k.get("a")
    k.close()
    again = FileKept(path, "t", 10 * SIZE)
    assert again.get("c") == {**VALUE, "key": "c"} and again.used == sum(
        size_of({**VALUE, "key": key}) for key in "abcd")  # fmt: skip
    again.close()
    smaller = FileKept(path, "t", 2 * size_of({**VALUE, "key": "a"}))  # b and d were used least lately
    assert [key for key in "abcd" if smaller.get(key) is not None] == ["a", "c"]
    assert FileKept(path, "other", SIZE).get("a") is None  # each table its own map


def test_a_directory_that_cannot_hold_the_file_is_said_in_one_line(tmp_path):
    assert check_dir(tmp_path / "new") is None and (tmp_path / "new" / FILE).exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / FILE).write_bytes(b"not a database, and kept as it is" * 100)
    why = check_dir(tmp_path / "bad")
    assert why is not None and FILE in why and "not a database" in why and "\n" not in why
    assert (tmp_path / "bad" / FILE).read_bytes().startswith(b"not a database")
    (tmp_path / "file").write_text("x")
    assert "file" in (check_dir(tmp_path / "file") or "")
    assert isinstance(open_kept(None, "t", 1), MemoryKept)


def test_a_bad_store_directory_stops_the_server_before_the_model_loads(tmp_path):
    (tmp_path / FILE).write_bytes(b"garbage" * 100)
    run = subprocess.run([sys.executable, "-m", "fastblt.cli", "serve", "--response-store-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "--response-store-dir" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "fastblt.cli", "serve", "--response-store-dir", str(tmp_path / "x"),
                          "--response-store-mb", "0"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2 and "nothing would be kept" in run.stderr


def test_a_restarted_server_continues_what_the_last_one_kept(tmp_path, chat_template):
    args = ["--max-batch", "4", "--api-key", KEY, "--chat-template", str(chat_template), "--chat-stop", CHAT_STOP,
            "--response-store-dir", str(tmp_path)]  # fmt: skip

    def client(srv) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    with ServerProcess(args) as srv:
        c = client(srv)
        first = c.responses.create(model="fastblt-default", input="def main(", max_output_tokens=8, temperature=0)
        conv = c.conversations.create(items=[{"role": "user", "content": "import os"}], metadata={"k": "v"})
        c.responses.create(model="fastblt-default", conversation=conv.id, input="x = ", max_output_tokens=4)
    with ServerProcess(args) as srv:
        c = client(srv)
        assert c.responses.retrieve(first.id).output_text == first.output_text
        then = c.responses.create(model="fastblt-default", input="print(", previous_response_id=first.id,
                                  max_output_tokens=4, temperature=0)  # fmt: skip
        assert then.usage.input_tokens > first.usage.input_tokens
        assert c.conversations.retrieve(conv.id).metadata == {"k": "v"}
        texts = [i.content[0].text for i in c.conversations.items.list(conv.id, order="asc").data]
        assert texts[:2] == ["import os", "x = "] and len(texts) == 3
    with sqlite3.connect(tmp_path / FILE) as db:  # what it holds, by table
        tables = dict(db.execute("SELECT 'responses', COUNT(*) FROM responses UNION ALL "
                                 "SELECT 'conversations', COUNT(*) FROM conversations").fetchall())  # fmt: skip
    assert tables == {"responses": 3, "conversations": 1}


def test_one_server_holds_a_store_directory_and_one_killed_leaves_its_background_responses_failed(
        tmp_path, chat_template):  # fmt: skip
    """A second server on the directory is refused at once, naming the first; a background
    response the killed first one ran reads failed from the next server on (no server runs it)."""
    args = ["--max-batch", "2", "--api-key", KEY, "--chat-template", str(chat_template), "--chat-stop", CHAT_STOP,
            "--response-store-dir", str(tmp_path)]  # fmt: skip
    with ServerProcess(args) as first:
        run = subprocess.run([sys.executable, "-m", "fastblt.cli", "serve", "--response-store-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert run.returncode == 2 and f"in use by another server (pid {first.proc.pid})" in run.stderr, run.stderr
        c = openai.OpenAI(base_url=f"{first.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        long = c.responses.create(model="fastblt-default", input="def main(", background=True, max_output_tokens=16000)
        deadline = time.monotonic() + 60
        while c.responses.retrieve(long.id).status == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.signal(signal.SIGKILL)
        first.proc.wait(30)
    with ServerProcess(args) as second:
        c = openai.OpenAI(base_url=f"{second.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        got = c.responses.retrieve(long.id)
        assert got.status == "failed" and "stopped before it ended" in got.error.message


def test_a_stopping_server_lets_its_background_responses_finish_within_its_grace_period(tmp_path, chat_template):
    """SIGTERM: a background response running then is answered (and kept) before the server exits,
    as requests in flight are, within --graceful-timeout; the next server reads it whole."""
    args = ["--max-batch", "2", "--api-key", KEY, "--chat-template", str(chat_template), "--chat-stop", CHAT_STOP,
            "--response-store-dir", str(tmp_path), "--graceful-timeout", "60"]  # fmt: skip
    ask = dict(
        model="fastblt-default", input="def main(", max_output_tokens=12000, temperature=0, extra_body={"mode": "ar"}
    )
    with ServerProcess(args) as first:
        c = openai.OpenAI(base_url=f"{first.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        running = c.responses.create(**ask, background=True)
        assert first.stop() == 0
    with ServerProcess(args) as second:
        c = openai.OpenAI(base_url=f"{second.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        got = c.responses.retrieve(running.id)
        assert got.status == "incomplete" and got.output_text == c.responses.create(**ask).output_text
