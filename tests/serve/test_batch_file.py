"""`fastblt batch`: an OpenAI batch file answered offline as the server answers each line, written
as requests end, never overwriting, resumable after a stop; a malformed file refused by its line."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import CHAT_STOP, CHAT_TEMPLATE

from fastblt.errors import InputError
from fastblt.serve.batch_file import Slots, answered, read_requests
from fastblt.serve.chat import ChatTemplate

from tiny import run_cli

MODEL = "fastblt-default"
MODES = ("ar", "blt-s", "blt-d", "blt-dv")


def line(cid: str, body: dict | str, url: str = "/v1/completions", **extra) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body, **extra}, ensure_ascii=False)


def write(path, lines: list[str]) -> None:
    path.write_text("".join(f"{x}\n" for x in lines))


# ---------------------------------------------------------------------------- the file's form
GOOD = line("a", {"model": MODEL, "prompt": "x"})


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", ":2: not JSON"),
        ("[1, 2]", ":2: expected an object with custom_id"),
        (line("b", {}, extra=1), ":2: unknown field 'extra'"),
        (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), ":2: custom_id: expected a non-empty"),
        (line("", {}), ":2: custom_id: expected a non-empty"),
        (line("a", {}), ":2: custom_id 'a' is line 1's too"),
        (line("b", {}).replace('"POST"', '"GET"'), ':2: method: expected "POST"'),
        (line("b", {}, url="/v1/embeddings"), ":2: url: expected one of /v1/completions, /v1/chat/completions"),
        (line("b", "x"), ":2: body: expected an object"),
        (line("b", {"prompt": "x", "stream": True}), ":2: body.stream"),
        (line("b", {"input": "x", "background": True}, url="/v1/responses"), ":2: body.background"),
    ],
)  # fmt: skip
def test_a_malformed_line_is_refused_by_its_number(tmp_path, bad, message):
    path = tmp_path / "in.jsonl"
    write(path, [GOOD, bad, line("c", {})])
    with pytest.raises(InputError, match=rf"^{tmp_path}/in.jsonl{message}"):
        read_requests(path)


def test_a_file_not_utf8_is_refused_by_its_line(tmp_path):
    path = tmp_path / "in.jsonl"
    data = f"{GOOD}\n".encode() + line("b", {"prompt": "x"}).encode().replace(b'"x"', b'"\xff"') + b"\n"
    path.write_bytes(data)
    at = data.index(b"\xff")
    with pytest.raises(InputError, match=rf"^{tmp_path}/in.jsonl:2: not UTF-8 \(byte 0xff at offset {at}\)$"):
        read_requests(path)


def test_requests_are_read_in_order_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "in.jsonl"
    write(path, [GOOD, "", "   \r", line("b", {"prompt": "ü\u2028\x1c", "stream": False}, url="/v1/chat/completions")])
    got = read_requests(path)
    assert [(r.line, r.custom_id, r.url) for r in got] == [
        (1, "a", "/v1/completions"),
        (4, "b", "/v1/chat/completions"),
    ]
    assert json.loads(got[1].body) == {"prompt": "ü\u2028\x1c", "stream": False}  # line breaks to str.splitlines


def test_resuming_cuts_only_a_half_written_last_line_of_our_own_file(tmp_path):
    ours = tmp_path / "out.jsonl"
    whole = [json.dumps({"custom_id": c, "response": {}}) for c in ("a", "b")]
    ours.write_text("\n".join(whole) + '\n{"custom_id": "c", "resp')
    assert answered(ours) == {"a", "b"} and ours.read_text() == "\n".join(whole) + "\n"
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text('{"x": 1}\n{"custom_id": "half')
    with pytest.raises(InputError, match="theirs.jsonl:1: not a line fastblt batch writes"):
        answered(theirs)
    assert theirs.read_text() == '{"x": 1}\n{"custom_id": "half'  # refused before anything was cut
    another = '{"custom_id": "a"}\n{"custom_id": "z"}\n{"custom_id": "b", "resp'  # another input's output
    ours.write_text(another)
    with pytest.raises(InputError, match=r"out.jsonl:2: custom_id 'z' is not in the input"):
        answered(ours, {"a", "b", "c"})
    assert ours.read_text() == another


# ---------------------------------------------------------------------------- the command
def requests(chat_template) -> tuple[list[str], dict[str, str]]:
    """Lines of every kind and the text each greedy one must get (Generator.generate's)."""
    from fastblt.runtime.generator import Generator

    g = Generator("default")
    lines, want = [], {}
    for i, mode in enumerate(MODES):
        prompt = f"def job_{i}(x):\n    return"
        lines.append(
            line(f"c{i}", {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "mode": mode})
        )
        want[f"c{i}"] = g.generate(prompt, mode=mode, max_bytes=24, temperature=0.0).text
    messages = [{"role": "user", "content": "def add(a, b):"}]
    lines.append(line("chat", {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0},
                      url="/v1/chat/completions"))  # fmt: skip
    prompt = ChatTemplate(CHAT_TEMPLATE).render(messages)
    want["chat"] = want["resp"] = g.generate(prompt, mode="blt-s", max_bytes=24, temperature=0.0, stop=[CHAT_STOP]).text
    lines.append(line("resp", {"model": MODEL, "input": messages[0]["content"], "max_output_tokens": 24,
                               "temperature": 0}, url="/v1/responses"))  # fmt: skip
    lines.append(line("bad", {"model": MODEL, "prompt": "x", "top_p": 7}))
    lines.append(line("n2", {"model": MODEL, "prompt": "import ", "max_tokens": 8, "n": 2, "seed": 5}))
    return lines, want


def answer_text(body: dict) -> str:
    """The text of a completion, a chat completion or a Response."""
    if "output" in body:
        return body["output"][0]["content"][0]["text"]
    (choice,) = body["choices"]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def outputs(path) -> dict[str, dict]:
    got = {}
    for raw in path.read_text().splitlines():
        item = json.loads(raw)
        assert item["custom_id"] not in got, f"{item['custom_id']} answered twice"
        assert item["id"].startswith("batch_req_") and item["error"] is None
        got[item["custom_id"]] = item["response"]
    return got


@pytest.mark.timeout(300)
def test_a_batch_is_answered_as_the_server_answers_and_resumes_after_a_stop(tmp_path, chat_template,
                                                                           monkeypatch, capsys):  # fmt: skip
    lines, want = requests(chat_template)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(src, lines)
    args = ["batch", str(src), "--out", str(out), "--chat-template", str(chat_template), "--chat-stop", CHAT_STOP,
            "--max-batch", "4", "--json"]  # fmt: skip
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 1, err  # the bad line's 400
    summary = json.loads(stdout)
    assert summary["statuses"] == {"200": 7, "400": 1} and summary["failed"] == 1 and summary["answered"] == 8
    got = outputs(out)
    assert set(got) == {json.loads(x)["custom_id"] for x in lines}
    for cid, text in want.items():
        body = got[cid]["body"]
        assert got[cid]["status_code"] == 200 and got[cid]["request_id"].startswith("req_")
        assert answer_text(body) == text
    assert got["bad"]["status_code"] == 400 and got["bad"]["body"]["error"]["param"] == "top_p"
    assert [c["index"] for c in got["n2"]["body"]["choices"]] == [0, 1]
    assert summary["completion_bytes"] == sum(r["body"]["usage"].get("completion_tokens", r["body"]["usage"].get(
        "output_tokens")) for r in got.values() if r["status_code"] == 200)  # fmt: skip

    before = out.read_bytes()
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "exists (never overwritten)" in err and out.read_bytes() == before

    kept = before.splitlines(keepends=True)[:3]
    out.write_bytes(b"".join(kept) + b'{"id": "batch_req_x", "custom_id": "c')  # stopped mid-line
    code, stdout, err = run_cli([*args, "--resume"], monkeypatch, capsys)
    failing = b'"custom_id": "bad"' not in b"".join(kept)  # the exit code is of the requests this run answered
    assert code == (1 if failing else 0) and "3 of 8 requests answered" in err
    assert json.loads(stdout)["answered"] == 5 and json.loads(stdout)["already"] == 3
    assert out.read_bytes().startswith(b"".join(kept))  # what was there stays, byte for byte
    again = outputs(out)
    assert set(again) == set(got) and all(answer_text(again[c]["body"]) == want[c] for c in want)

    # the bad line fixed in the input: --retry-errors answers it again, in place of its error line
    write(src, [x.replace('"top_p": 7', '"top_p": 0.7') for x in lines])
    others = [x for x in out.read_bytes().splitlines(keepends=True) if b'"custom_id": "bad"' not in x]
    code, _, err = run_cli([*args, "--retry-errors"], monkeypatch, capsys)
    assert code == 2 and "--retry-errors applies only with --resume" in err
    code, stdout, err = run_cli([*args, "--resume", "--retry-errors"], monkeypatch, capsys)
    assert code == 0 and "1 error line(s) taken out" in err and json.loads(stdout)["answered"] == 1
    assert out.read_bytes().startswith(b"".join(others))  # the other answers kept byte for byte
    fixed = outputs(out)
    assert set(fixed) == set(got) and fixed["bad"]["status_code"] == 200


def test_the_output_is_never_the_input(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.jsonl"
    write(src, [GOOD])
    code, _, err = run_cli(["batch", str(src), "--out", str(src), "--resume"], monkeypatch, capsys)
    assert code == 2 and "--out is the input file" in err and src.read_text() == GOOD + "\n"
    write(src, [GOOD, "{bad"])
    code, _, err = run_cli(["batch", str(src), "--out", str(tmp_path / "o.jsonl")], monkeypatch, capsys)
    assert code == 2 and "in.jsonl:2: not JSON" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "url, out, message",
    [
        ("/v1/chat/completions", "o.jsonl", "in.jsonl:2: url: /v1/chat/completions needs --chat-template"),
        ("/v1/responses", "o.jsonl", "in.jsonl:2: url: /v1/responses needs --chat-template"),
        ("/v1/completions", "no/o.jsonl", "Invalid value for '--out': no/o.jsonl: no directory no to write it in"),
        ("/v1/completions", "-", "Invalid value for '--out': - (stdout): the answers go to a file"),
    ],
)  # fmt: skip
def test_a_run_that_cannot_go_through_is_refused_before_the_engine_loads(tmp_path, monkeypatch, capsys, url, out,
                                                                         message):  # fmt: skip
    def load(*args, **kwargs):
        raise AssertionError("the engine loaded")

    monkeypatch.setattr("fastblt.cli.batch.start_engine", load)
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "in.jsonl", [GOOD, line("b", {"model": MODEL, "prompt": "x"}, url=url), line("c", {})])
    code, _, err = run_cli(["batch", "in.jsonl", "--out", out], monkeypatch, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written


def test_resuming_into_another_inputs_output_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fastblt.cli.batch.start_engine", lambda *a, **k: pytest.fail("the engine loaded"))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write(src, [GOOD, line("b", {"model": MODEL, "prompt": "x"})])
    theirs = '{"custom_id": "a", "response": {}}\n{"custom_id": "zz", "response": {}}\n{"custom_id": "q'
    out.write_text(theirs)
    code, _, err = run_cli(["batch", str(src), "--out", str(out), "--resume", "--retry-errors"], monkeypatch, capsys)
    assert code == 2 and "out.jsonl:2: custom_id 'zz' is not in the input" in err, err
    assert out.read_text() == theirs  # not cut, nor its lines taken out


def test_slots_follow_their_limit_as_it_changes():
    """At most limit() holders; a limit that grows lets waiters in at the next release (as many
    as it has room for), one that shrinks lets none in until the holders are below it."""

    async def run() -> list[int]:
        limit, held, most = [2], [0], []
        slots = Slots(lambda: limit[0])

        async def hold(t: float) -> None:
            async with slots:
                held[0] += 1
                most.append(held[0])
                await asyncio.sleep(t)
                held[0] -= 1

        first = [asyncio.create_task(hold(0.05)) for _ in range(2)]
        await asyncio.sleep(0.01)
        limit[0] = 5  # grows: 3 of the waiting go in once one of the two releases
        more = [asyncio.create_task(hold(0.05)) for _ in range(6)]
        await asyncio.gather(*first, *more)
        assert max(most) == 5
        limit[0], most[:] = 1, []
        await asyncio.gather(*(hold(0.01) for _ in range(4)))
        return most

    assert asyncio.run(run()) == [1, 1, 1, 1]
