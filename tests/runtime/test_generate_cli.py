"""`fastblt generate` and `fastblt bench` on a tiny checkpoint (torch backend)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import pytest
from runtime_refs import tiny_model, torch_generator

from fastblt.cli import main
from fastblt.formats.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tiny_model(), tmp_path_factory.mktemp("ckpt") / "tiny")


def run_cli(args: list[str], monkeypatch) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "argv", ["fastblt", *args])
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def test_generate_text_json_and_stream(ckpt, monkeypatch):
    base = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--max-bytes", "24", "--ignore-eos"]
    code, out, _ = run_cli([*base, "--prompt", "def main(", "--mode", "blt-s", "--json"], monkeypatch)
    assert code == 0
    record = json.loads(out)
    want = torch_generator().generate("def main(", mode="ar", max_bytes=24, stop_on_eos=False)
    assert bytes.fromhex(record["bytes_hex"]) == want.bytes  # lossless
    assert record["stats"]["generated"] == 24 and record["stats"]["mode"] == "blt-s"
    code, streamed, _ = run_cli([*base, "--prompt", "def main(", "--mode", "ar", "--stream"], monkeypatch)
    assert code == 0 and streamed == want.text + "\n"


def test_generate_prompt_file_with_raw_bytes(ckpt, tmp_path, monkeypatch):
    f = tmp_path / "p.bin"
    f.write_bytes(b"\xff\xfe\x00 raw")
    args = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--prompt-file", str(f), "--mode", "ar"]
    code, out, err = run_cli([*args, "--max-bytes", "8", "--json"], monkeypatch)
    assert code == 0, err
    assert json.loads(out)["stats"]["prompt_ids"] == 1 + 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "beam"], "Invalid value for '--mode'"),
        (["--backend", "cuda"], "Invalid value for '--backend'"),
        (["--max-bytes", "0"], "max_bytes"),
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "1", "--top-p", "2"], "top_p"),
        (["--prompt", "again"], "exactly one of --prompt"),
        (["--logit-bias", "10"], "expected BYTE=BIAS"),
        (["--logit-bias", "a=1"], "expected BYTE=BIAS"),
        (["--logit-bias", "300=1"], "option logit_bias byte"),
        (["--logit-bias", "10=-101"], "option logit_bias[10]"),
        (["--frequency-penalty", "3"], "option frequency_penalty"),
        (["--mode", "ar", "--regex", "(?<=a)b"], "option pattern: lookbehinds"),
        (["--mode", "ar", "--regex", "(?i)ab"], "option pattern: inline flags"),
        (["--stream", "--json"], "--stream prints text as it comes, --json one record"),
        (["--regex", "a"], "diffusion head"),
    ],
)
def test_generate_bad_input_exits_2(ckpt, monkeypatch, args, message):
    base = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--prompt", "x"]
    if args[0] == "--prompt":
        base = base[:-2] + ["--prompt-file", "/dev/null"]
    code, _, err = run_cli([*base, *args], monkeypatch)
    assert code == 2 and message in err


def test_generate_logit_bias_and_penalties_reach_the_request(ckpt, monkeypatch):
    """--logit-bias BYTE=BIAS (repeatable): +100 on "x" makes every byte an "x", in a verified mode too;
    --presence-penalty / --frequency-penalty: the Generator's bytes with the same penalties."""
    base = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--prompt", "def main(", "--max-bytes", "12"]
    code, out, err = run_cli([*base, "--mode", "blt-s", "--ignore-eos", "--logit-bias", "120=100", "--logit-bias",
                              "10=-5.5"], monkeypatch)  # fmt: skip
    assert code == 0 and out == "x" * 12 + "\n", err
    want = torch_generator().generate("def main(", mode="ar", max_bytes=12, presence_penalty=-1.5, frequency_penalty=2)
    assert want.bytes != torch_generator().generate("def main(", mode="ar", max_bytes=12).bytes
    code, out, err = run_cli([*base, "--mode", "blt-s", "--presence-penalty", "-1.5", "--frequency-penalty", "2",
                              "--json"], monkeypatch)  # fmt: skip
    assert code == 0 and bytes.fromhex(json.loads(out)["bytes_hex"]) == want.bytes, err


def test_generate_regex_holds_the_whole_output(ckpt, monkeypatch):
    base = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--prompt", "def main(", "--max-bytes", "24"]
    code, out, err = run_cli([*base, "--mode", "blt-s", "--regex", "(yes|no)-[0-9]{2}"], monkeypatch)
    want = torch_generator().generate("def main(", mode="ar", max_bytes=24, pattern="(yes|no)-[0-9]{2}")
    assert code == 0 and out == want.text + "\n" and want.stop_reason == "eos", err
    assert re.fullmatch("(yes|no)-[0-9]{2}", want.text)


def test_generate_grammar_file_derives_the_whole_output(ckpt, tmp_path, monkeypatch):
    source = 'start: NAME "(" [NAME (", " NAME)*] ")"\nNAME: /[a-z_]+/\n'
    (tmp_path / "g.lark").write_text(source)
    base = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--prompt", "x = ", "--max-bytes", "24"]
    code, out, err = run_cli([*base, "--mode", "ar", "--grammar", str(tmp_path / "g.lark")], monkeypatch)
    want = torch_generator().generate("x = ", mode="ar", max_bytes=24, grammar=source)
    assert code == 0 and out == want.text + "\n", err
    code, _, err = run_cli([*base, "--mode", "ar", "--grammar", str(tmp_path / "none.lark")], monkeypatch)
    assert code == 2 and "--grammar" in err and "no such file" in err


def test_generate_max_context_bounds_the_call(ckpt, monkeypatch):
    """--max-context reaches the Generator: a prompt + --max-bytes past it is refused (exit 2,
    naming max_context) instead of running unbounded."""
    base = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--mode", "ar", "--prompt", "def main("]
    code, _, err = run_cli([*base, "--max-bytes", "4", "--max-context", "8"], monkeypatch)
    assert code == 2 and "max_context 8" in err, err
    code, _, err = run_cli([*base, "--max-bytes", "4", "--max-context", "14"], monkeypatch)  # BOS + 9 + 4 fit
    assert code == 0, err


def test_generate_ignore_eos_reaches_the_request(ckpt, monkeypatch):
    """--ignore-eos turns stop_on_eos off in the request generated (EOS otherwise ends the output)."""
    from fastblt.runtime.generator import Generator

    seen = []
    real = Generator.generate

    def generate(self, request, *args, **kwargs):
        seen.append(request.opts.stop_on_eos)
        return real(self, request, *args, **kwargs)

    monkeypatch.setattr(Generator, "generate", generate)
    base = ["generate", "--checkpoint", str(ckpt), "--backend", "torch", "--mode", "ar", "--prompt", "x"]
    for extra in (["--ignore-eos"], []):
        code, _, err = run_cli([*base, "--max-bytes", "4", "--json", *extra], monkeypatch)
        assert code == 0, err
    assert seen == [False, True]


def test_generate_blt_d_on_plain_blt_checkpoint(tmp_path, monkeypatch):
    from tiny import make_model

    plain = save_checkpoint(make_model(blt_d=False), tmp_path / "plain")
    code, _, err = run_cli(
        ["generate", "--checkpoint", str(plain), "--backend", "torch", "--prompt", "x", "--mode", "blt-d"], monkeypatch
    )
    assert code == 2 and "BLT-D checkpoint" in err


def test_bench_writes_its_table(ckpt, tmp_path, monkeypatch):
    args = ["bench", "--checkpoint", str(ckpt), "--backends", "torch", "--max-bytes", "12", "--prompts", "1"]
    code, out, err = run_cli([*args, "--no-comparison", "--out", str(tmp_path), "--json"], monkeypatch)
    assert code == 0, err
    result = json.loads(out)
    assert {r["name"] for r in result["rows"]} == {"ar", "blt-s", "blt-dv", "blt-d"}
    assert result["hf"]["identical_to_ar"] == {"torch": True}
    assert all(r["identical_to_ar"] for r in result["rows"] if r["mode"] in ("blt-s", "blt-dv"))
    assert {t["target"].split(" vs")[0] for t in result["targets"]} >= {"blt-s", "blt-dv", "blt-d"}
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"runtime_bench.{ext}").stat().st_size > 0
