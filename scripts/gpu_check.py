"""The GPU check (run by scripts/gpu_check.sh): what CPUs cannot prove, in one run of at most 10 minutes.

On a machine with an NVIDIA GPU:
  1. the torch backend on the GPU (every cache on the device) against the    fastblt validate
     CPU reference: every graph, and greedy ar / blt-s / blt-d / blt-dv
     byte for byte                                                          --device cuda
  2. its speed per mode, with CUDA graphs and eager                         fastblt bench --device cuda
With TensorRT as well:
  3. export the checkpoint (default: the embedded one) in fp32 and fp16      fastblt export
  4. build one engine per graph, both dtypes                                 fastblt build
  5. per-graph parity: torch vs ort, torch vs trt, ort vs trt (polygraphy),  fastblt validate
     composite gates for fp16; fp32 also end to end: greedy ar / blt-s /
     blt-d / blt-dv on ort and trt byte for byte against torch
  6. greedy lossless modes on trt: blt-s and blt-dv == ar, per dtype        (in this script)
  7. fastblt bench --backends trt on the fp16 engines                        fastblt bench
and write one report: OUT/gpu_check.json and OUT/gpu_check.md (validate's and bench's own
reports in OUT/validate-*/ and OUT/bench-*/). Exit 0 when every check that can run here passed
(without TensorRT, steps 3-7 are reported as not run, with the reason), 1 when one failed.
Without a CUDA device it prints one SKIP line, writes a "skipped" report, exits 0.

Steps 1-2 ran on an H100 (docs/gpu.md); steps 3-7 have not run on a GPU with TensorRT yet.
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
        from fastblt.engines.trt.backend import TrtBackend
        from fastblt.export.exporter import ExportOptions
        from fastblt.export.manifest import read_manifest
        from fastblt.formats.checkpoint import load_checkpoint, resolve_checkpoint_path
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


def bench_summary(check: Check) -> None:
    """Shorten a `fastblt bench --json` record into the check's detail: bytes/s per mode."""
    r = check.data
    if not isinstance(r, dict):
        return
    rows = [row for row in r.get("rows", []) if "/" not in row.get("name", "")]
    check.detail += "; " + ", ".join(f"{row['name']} {row['bytes_per_s']:.0f} B/s" for row in rows)
    check.data = {"rows": r.get("rows"), "targets": r.get("targets"), "meta": r.get("meta")}


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
def cuda_checks(runner: Runner, args: argparse.Namespace) -> None:
    """The torch backend on the GPU (caches on the device) against the CPU reference, then its speed."""
    val = ["validate", "--checkpoint", args.checkpoint, "--backends", "torch", "--device", "cuda"]
    val += ["--capacity", str(args.max_context), "--max-bytes", str(args.max_bytes)]
    val += ["--report", str(args.out / "validate-cuda"), "--json"]
    validate_summary(runner.command("parity torch on cuda (fp32)", val, parse_json=True))
    bench = ["bench", "--checkpoint", args.checkpoint, "--backends", "torch", "--device", "cuda", "--no-hf", "--json"]
    bench_summary(runner.command("bench torch on cuda", bench + ["--out", str(args.out / "bench-cuda")], True))
    eager = bench + ["--no-cuda-graphs", "--no-comparison", "--out", str(args.out / "bench-cuda-eager")]
    bench_summary(runner.command("bench torch on cuda, eager", eager, parse_json=True))


def trt_checks(runner: Runner, args: argparse.Namespace) -> None:
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
        bench = ["bench", "--checkpoint", args.checkpoint, "--backends", "trt", "--artifacts", str(arts["fp16"])]
        bench += ["--no-hf", "--out", str(args.out / "bench-trt"), "--json"]
        bench_summary(runner.command("bench trt (fp16)", bench, parse_json=True))
    else:
        runner.skip("bench trt (fp16)", "not run: an engine build failed")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--max-bytes", type=int, default=24)
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for every check together")
    args = ap.parse_args(argv)

    import torch

    from fastblt.engines.trt.build import trt_availability

    status = trt_availability()
    if not torch.cuda.is_available():
        line = f"gpu_check: SKIP: no CUDA device here (torch {torch.__version__}); TensorRT: {status.reason}."
        line += " Nothing was run."
        print(line, flush=True)
        write_report(args.out, "skipped", environment(), [], line)
        return 0
    print(f"gpu_check: {torch.cuda.get_device_name()}; report in {args.out}", flush=True)
    env = environment()
    runner = Runner(args.out, args.budget)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cuda_checks(runner, args)
    note = ""
    if status.available:
        trt_checks(runner, args)
    else:
        note = f"TensorRT is not usable here ({status.reason}): its checks did not run."
        print(f"gpu_check: SKIP trt: {note}", flush=True)
    verdict = "pass" if runner.passed else "fail"
    jpath, mpath = write_report(args.out, verdict, env, runner.checks, note)
    failed = [c.name for c in runner.checks if c.status != "pass"]
    print(
        f"gpu_check: {verdict.upper()}: {len(runner.checks) - len(failed)}/{len(runner.checks)} checks passed"
        + (f"; failed or not run: {', '.join(failed)}" if failed else "")
        + f". Report: {jpath}, {mpath}"
    )
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
