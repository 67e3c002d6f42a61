"""What the command line does with input it cannot use: one line on stderr and exit 2, never a
traceback; and with a reader that leaves early: a quiet stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastblt.formats.checkpoint import save_checkpoint

from tiny import make_model, run_cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(make_model(), tmp_path_factory.mktemp("ckpt") / "tiny")


def _generate(ckpt, *args: str) -> list[str]:
    return ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--mode", "ar", *args]


def _one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and one error line naming what is wrong (a usage error also shows click's usage)."""
    lines = [line for line in err.splitlines() if line.lower().startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), err


def test_a_prompt_that_cannot_be_read_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(_generate(ckpt, "--prompt-file", str(tmp_path)), monkeypatch, capsys)
    _one_line_error(code, err, "--prompt-file", str(tmp_path), "Is a directory")
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed (`<&-`)
    code, _, err = run_cli(_generate(ckpt, "--prompt-file", "-"), monkeypatch, capsys)
    _one_line_error(code, err, "standard input is closed")


def test_arguments_that_are_not_utf8_are_their_bytes(ckpt, monkeypatch, capsys):
    """argv bytes that are not UTF-8 reach Python as lone surrogates: the prompt and stop strings
    are the bytes the user typed."""
    raw = b"ab\xffcd".decode("utf-8", "surrogateescape")
    code, out, err = run_cli(_generate(ckpt, "--prompt", raw, "--stop", raw, "--max-bytes", "4", "--json"),
                             monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["stats"]["prompt_ids"] == 1 + 5


@pytest.mark.parametrize("option", ["--top-p", "--top-k"])
def test_sampling_options_without_a_temperature_are_refused(ckpt, option, monkeypatch, capsys):
    """Greedy decoding would ignore them: the user meant to sample and would not know they did not."""
    code, _, err = run_cli(_generate(ckpt, "--prompt", "x", option, "1"), monkeypatch, capsys)
    _one_line_error(code, err, option, "--temperature 0")
    code, out, err = run_cli(_generate(ckpt, "--prompt", "x", option, "1", "--temperature", "0.5", "--seed", "3",
                                       "--max-bytes", "2", "--json"), monkeypatch, capsys)  # fmt: skip
    assert code == 0 and json.loads(out)["stop_reason"], err


def test_logprobs_go_into_the_json_record(ckpt, monkeypatch, capsys):
    code, _, err = run_cli(_generate(ckpt, "--prompt", "x", "--logprobs", "2"), monkeypatch, capsys)
    _one_line_error(code, err, "--logprobs", "--json")
    code, out, err = run_cli(_generate(ckpt, "--prompt", "x", "--logprobs", "2", "--max-bytes", "5", "--json",
                                       "--ignore-eos"), monkeypatch, capsys)  # fmt: skip
    record = json.loads(out)
    assert code == 0 and len(record["ids"]) == len(record["logprobs"]) == len(record["top_logprobs"]) == 5, err
    assert all(len(top) == 2 and max(top.values()) <= 0 for top in record["top_logprobs"])
    code, _, err = run_cli(_generate(ckpt, "--prompt", "x", "--logprobs", "21", "--json"), monkeypatch, capsys)
    assert code == 2 and "--logprobs" in err


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--prompt", "x", "--threads", "0"],
        ["validate", "--threads", "-1"],
        ["validate", "--atol", "nan"],
        ["validate", "--atol", "-1"],
        ["serve", "--threads", "0"],
        ["train", "--minutes", "nan"],
        ["train", "--entropy-minutes", "-1"],
    ],
)
def test_numbers_out_of_range_are_refused_by_the_option(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # were one accepted, whatever it started would write here
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and f"Invalid value for '{args[-2]}'" in err and "Traceback" not in err


def test_a_schema_file_that_cannot_be_used_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(_generate(ckpt, "--prompt", "x", "--schema", str(tmp_path / "none.json")), monkeypatch,
                           capsys)  # fmt: skip
    _one_line_error(code, err, "--schema", "none.json: no such file")
    schema = tmp_path / "schema.json"
    schema.write_text('{"properties": {"a": {"type": "string", "format": "uri-reference"}}, "required": ["a"]}')
    code, _, err = run_cli(_generate(ckpt, "--prompt", "x", "--mode", "ar", "--schema", str(schema)), monkeypatch,
                           capsys)  # fmt: skip
    _one_line_error(code, err, "option schema.properties.a.format: 'uri-reference' is not one of the formats held")


def test_an_output_path_that_cannot_be_written_is_one_line(ckpt, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    args = ["convert", str(ckpt), "--to", "fastblt", "--out", str(blocker / "out")]
    code, _, err = run_cli(args, monkeypatch, capsys)
    _one_line_error(code, err, str(blocker))
    assert blocker.read_text() == "mine"


def test_a_reader_that_leaves_stops_the_stream_quietly(ckpt):
    """`fastblt generate --stream | head -c1`: the exit status of a process stopped by SIGPIPE
    (141), nothing on stderr (click alone would exit 1, our "a gate failed")."""
    cmd = [sys.executable, "-m", "fastblt.cli", *_generate(ckpt, "--prompt", "x", "--stream", "--max-bytes", "200")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # gone before the first byte: its first write finds no reader
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b"", err.decode(errors="replace")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [["info"], ["info", "--json"]])
def test_a_full_stdout_is_named(args):
    """`fastblt info > /dev/full`: one line naming stdout (a write's OSError names no file), exit 2."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "fastblt.cli", *args], stdout=full, stderr=subprocess.PIPE,
                              timeout=120)  # fmt: skip
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and err == "error: stdout: No space left on device\n", err


def test_convert_into_a_directory_of_other_files_needs_force(ckpt, tmp_path, monkeypatch, capsys):
    """`--out` pointing at a directory that holds someone's files must not wipe them unless the
    user said --force: exit 2, one line naming the directory and --force, the file kept."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["convert", str(ckpt), "--to", "fastblt", "--out", str(out)]
    code, _, err = run_cli(args, monkeypatch, capsys)
    _one_line_error(code, err, str(out), "notes.txt", "pass --force to replace it")
    assert "overwrite=True" not in err  # the Python API's spelling, not an option of the command
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    code, _, err = run_cli([*args, "--force"], monkeypatch, capsys)
    assert code == 0 and not (out / "notes.txt").exists() and (out / "model.safetensors").is_file(), err


def test_every_option_may_come_from_the_environment_and_a_flag_given_wins(ckpt, monkeypatch, capsys):
    """FASTBLT_<COMMAND>_<OPTION>, named after the long flag (not the parameter), as containers set them."""
    monkeypatch.setenv("FASTBLT_GENERATE_MAX_BYTES", "3")
    monkeypatch.setenv("FASTBLT_GENERATE_JSON", "1")  # a flag; its parameter is as_json
    monkeypatch.setenv("FASTBLT_GENERATE_IGNORE_EOS", "true")
    code, out, err = run_cli(_generate(ckpt, "--prompt", "x"), monkeypatch, capsys)
    assert code == 0 and json.loads(out)["stats"]["generated"] == 3, err
    code, out, err = run_cli(_generate(ckpt, "--prompt", "x", "--max-bytes", "5"), monkeypatch, capsys)
    assert code == 0 and json.loads(out)["stats"]["generated"] == 5, err  # the command line wins
    monkeypatch.setenv("FASTBLT_SERVE_ALLOWED_ORIGIN", "https://a.example https://b.example/")  # several: spaces
    code, _, err = run_cli(["serve"], monkeypatch, capsys)
    _one_line_error(code, err, "--allowed-origin", "'https://b.example/'")
    monkeypatch.setenv("FASTBLT_GENERATE_MAX_BYTES", "-1")  # checked as the flag's value would be
    code, _, err = run_cli(_generate(ckpt, "--prompt", "x"), monkeypatch, capsys)
    _one_line_error(code, err, "max_bytes", "-1")
