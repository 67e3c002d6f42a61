"""The GPU check (run by scripts/gpu_check.sh): everything TensorRT-specific that CPUs cannot prove.

On a machine with an NVIDIA GPU and TensorRT, in one run of at most 10 minutes:
  1. export the checkpoint (default: the embedded one) in fp32 and fp16      fastblt export
  2. build one engine per graph, both dtypes                                 fastblt build
  3. per-graph parity: torch vs ort, torch vs trt, ort vs trt (polygraphy),  fastblt validate
     composite gates for fp16; fp32 also end to end: greedy ar / blt-s /
     blt-d / blt-dv on ort and trt byte for byte against torch
  4. greedy lossless modes on trt: blt-s and blt-dv == ar, per dtype        (in this script)
  5. fastblt bench --backend trt, and the torch-CUDA baseline                fastblt bench
and write one report: OUT/gpu_check.json and OUT/gpu_check.md (validate's own reports in
OUT/validate-<dtype>/). Exit 0 when every check passed, 1 when one failed or did not run.
Without TensorRT or a CUDA device it prints one SKIP line, writes a "skipped" report, exits 0.

Nothing in this file has run on a GPU with TensorRT yet (see the TensorRT section of README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUDGET_S = 560  # gpu_check.sh kills at 600 s; leave time to write the report
DTYPES = ("fp32", "fp16")
TAIL = 3000  # characters of a failed command's output kept in the report


@dataclass
class Check:
    name: str
    status: str  # "pass" | "fail" | "not run"
    seconds: float = 0.0
    detail: str = ""
    command: list[str] | None = None
    output_tail: str = ""
    data: Any = field(default=None, repr=False)


class Runner:
    """Runs checks against a wall-clock budget and collects them."""

    def __init__(self, out: Path, budget_s: float):
        self.out = out
        self.deadline = time.monotonic() + budget_s
        self.checks: list[Check] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(f"gpu_check: {check.status.upper():<7} {check.name} ({check.seconds:.1f} s) {check.detail}", flush=True)
        return check

    def skip(self, name: str, why: str) -> Check:
        return self.add(Check(name, "not run", detail=why))

    def command(self, name: str, args: list[str], parse_json: bool = False) -> Check:
        """`python -m fastblt.cli ARGS` with the remaining budget as its timeout."""
        if self.left() < 5:
            return self.skip(name, "not run: the 10-minute budget is spent")
        cmd = [sys.executable, "-m", "fastblt.cli", *args]
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.left())
        except subprocess.TimeoutExpired:
            return self.add(Check(name, "fail", time.monotonic() - t0, "timed out (budget spent)", cmd))
        dt = time.monotonic() - t0
        data = None
        if parse_json and p.stdout.strip():
            try:
                data = json.loads(p.stdout)
            except json.JSONDecodeError:
                data = None
        ok = p.returncode == 0
        detail = f"exit {p.returncode}" + ("" if ok else f": {_last_line(p.stderr)}")
        tail = "" if ok else (p.stdout + p.stderr)[-TAIL:]
        return self.add(Check(name, "pass" if ok else "fail", dt, detail, cmd, tail, data))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.status == "pass" for c in self.checks)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


# ------------------------------------------------------------------------------ checks
def lossless_on_trt(runner: Runner, dtype: str, art: Path, checkpoint: str, max_bytes: int) -> Check:
    """Greedy ar, blt-s, blt-dv and blt-d on the trt backend; blt-s and blt-dv must equal ar."""
    name = f"lossless modes on trt ({dtype})"
    if runner.left() < 30:
        return runner.skip(name, "not run: the 10-minute budget is spent")
    t0 = time.monotonic()
    try:
        from fastblt.engines.trt_backend import TrtBackend
        from fastblt.export.exporter import ExportOptions
        from fastblt.export.manifest import read_manifest
        from fastblt.model.checkpoint import load_checkpoint, resolve_checkpoint_path
        from fastblt.validate.e2e import fit_prompt, make_generator
        from fastblt.validate.graphs import DEFAULT_PROMPTS

        manifest = read_manifest(art)
        model = load_checkpoint(resolve_checkpoint_path(checkpoint)).eval()
        options = ExportOptions(**manifest["options"])
        backend = TrtBackend(options.specs(model.config), art)
        gen = make_generator(model, backend, options.capacity, options.patch_capacity)
        modes = ["ar", "blt-s"] + (["blt-d", "blt-dv"] if model.config.blt_d is not None else [])
        block = model.config.blt_d.block_size if model.config.blt_d is not None else 0
        results, bad = {}, []
        for i, prompt in enumerate(DEFAULT_PROMPTS):
            prompt = fit_prompt(prompt, options.capacity, max_bytes, block)
            ids, texts = {}, {}
            for mode in modes:
                out = gen.generate(prompt, mode=mode, max_bytes=max_bytes, temperature=0.0, stop_on_eos=False)
                ids[mode], texts[mode] = list(out.ids), out.text
            results[f"prompt {i}"] = texts
            bad += [f"prompt {i}: {m} != ar" for m in ("blt-s", "blt-dv") if m in ids and ids[m] != ids["ar"]]
        backend.deactivate()
        status, detail = ("pass", f"{len(DEFAULT_PROMPTS)} prompts x {modes}") if not bad else ("fail", "; ".join(bad))
        return runner.add(Check(name, status, time.monotonic() - t0, detail, data=results))
    except Exception as e:  # noqa: BLE001 - a crash is this check's failure, reported with its message
        return runner.add(Check(name, "fail", time.monotonic() - t0, f"{type(e).__name__}: {e}"))


def bench_checks(runner: Runner, art: Path) -> None:
    """`fastblt bench --backend trt` and the torch-CUDA baseline, as the bench command offers them."""
    probe = subprocess.run(
        [sys.executable, "-m", "fastblt.cli", "bench", "--help"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        why = f"fastblt bench is not available in this checkout ({_last_line(probe.stderr) or 'no such command'})"
        runner.add(Check("bench trt", "fail", detail=why))
        runner.add(Check("bench torch-cuda baseline", "fail", detail=why))
        return
    helptext = probe.stdout
    common = ["--json"] if "--json" in helptext else []
    trt = ["bench", "--backend", "trt", *(["--artifacts", str(art)] if "--artifacts" in helptext else []), *common]
    runner.command("bench trt", trt, parse_json=True)
    if "--device" in helptext:
        runner.command("bench torch-cuda baseline", ["bench", "--backend", "torch", "--device", "cuda", *common], True)
    else:
        runner.add(Check("bench torch-cuda baseline", "fail", detail="fastblt bench has no --device option"))


def validate_summary(check: Check) -> None:
    """Shorten a `fastblt validate --json` report into the check's detail."""
    r = check.data
    if not isinstance(r, dict):
        return
    verdict = r.get("verdict") or ("pass" if r.get("passed") else "fail")
    check.detail += f"; verdict {verdict}, {r.get('compared')} compared, {r.get('failed')} failed"
    check.data = {k: r.get(k) for k in ("verdict", "compared", "failed", "failures", "skipped", "meta") if k in r}
    check.data["graphs_passed"] = {
        pair: {g: v.get("passed") for g, v in p.get("graphs", {}).items()} for pair, p in r.get("pairs", {}).items()
    }


# ------------------------------------------------------------------------------ report
def environment() -> dict[str, Any]:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        env["tensorrt"] = f"not importable: {e}"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = "not installed"
    return env


def write_report(out: Path, verdict: str, env: dict, checks: list[Check], note: str = "") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    report = {"verdict": verdict, "note": note, "environment": env, "checks": [asdict(c) for c in checks]}
    jpath, mpath = out / "gpu_check.json", out / "gpu_check.md"
    jpath.write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"# fastblt GPU check: {verdict.upper()}", ""]
    if note:
        lines += [note, ""]
    lines += ["| environment | |", "|---|---|", *[f"| {k} | {v} |" for k, v in env.items()], ""]
    if checks:
        lines += ["| check | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.status} | {c.seconds:.1f} | {c.detail.replace('|', '/')} |" for c in checks]
    for c in checks:
        if c.status != "pass" and c.output_tail:
            lines += ["", f"## {c.name}", "", "```", c.output_tail, "```"]
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--max-bytes", type=int, default=24)
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for every check together")
    args = ap.parse_args(argv)

    from fastblt.engines.trt_build import trt_availability

    status = trt_availability()
    if not status.available:
        line = f"gpu_check: SKIP: TensorRT is not usable here: {status.reason}. Nothing was run."
        print(line, flush=True)
        write_report(args.out, "skipped", environment(), [], line)
        return 0
    print(f"gpu_check: {status.reason}; report in {args.out}", flush=True)
    env = environment()
    runner = Runner(args.out, args.budget)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    arts = {}
    for dtype in DTYPES:
        art = args.out / f"artifacts-{dtype}"
        arts[dtype] = art
        exp = runner.command(
            f"export {dtype}",
            ["export", "--checkpoint", args.checkpoint, "--out", str(art), "--dtype", dtype]
            + ["--max-context", str(args.max_context), "--max-batch", "2", "--force"],
        )
        if exp.status != "pass":
            for what in (f"build {dtype}", f"parity ({dtype})", f"lossless modes on trt ({dtype})"):
                runner.skip(what, f"not run: export {dtype} failed")
            continue
        build = runner.command(
            f"build {dtype}",
            ["build", "--artifacts", str(art), "--max-batch", "2", "--json"]
            + ["--timing-cache", str(args.out / "timing.cache")],
            parse_json=True,
        )
        if build.status != "pass":
            runner.skip(f"parity ({dtype})", f"not run: build {dtype} failed")
            runner.skip(f"lossless modes on trt ({dtype})", f"not run: build {dtype} failed")
            continue
        val = ["validate", "--checkpoint", args.checkpoint, "--artifacts", str(art), "--backends", "ort,trt"]
        val += ["--max-bytes", str(args.max_bytes), "--report", str(args.out / f"validate-{dtype}"), "--json"]
        if dtype != "fp32":
            val.append("--no-e2e")  # reduced precision: composite gates per graph; bytes are compared in fp32
        parity = runner.command(f"parity ({dtype})", val, parse_json=True)
        validate_summary(parity)
        lossless_on_trt(runner, dtype, art, args.checkpoint, args.max_bytes)
    if all(c.status == "pass" for c in runner.checks if c.name.startswith("build")):
        bench_checks(runner, arts["fp16"])
    else:
        runner.skip("bench trt", "not run: an engine build failed")
    verdict = "pass" if runner.passed else "fail"
    jpath, mpath = write_report(args.out, verdict, env, runner.checks)
    failed = [c.name for c in runner.checks if c.status != "pass"]
    print(
        f"gpu_check: {verdict.upper()}: {len(runner.checks) - len(failed)}/{len(runner.checks)} checks passed"
        + (f"; failed or not run: {', '.join(failed)}" if failed else "")
        + f". Report: {jpath}, {mpath}"
    )
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
