"""The GPU check (run by scripts/gpu_check.sh): what CPUs cannot prove, in one run of at most 10 minutes.

On a machine with an NVIDIA GPU:
  1. the torch backend on the GPU (every cache on the device) against the    fastblt validate
     CPU reference: every graph, and greedy ar / blt-s / blt-d / blt-dv
     byte for byte                                                          --device cuda
     and 16 greedy requests batched equal to the same requests alone         (in this script)
  2. its speed per mode, with CUDA graphs and eager                         fastblt bench --device cuda
With onnxruntime's CUDAExecutionProvider (onnxruntime-gpu; else skipped, with the reason):
  3. export in fp32; where onnxruntime places each graph's nodes (the ops   fastblt export
     that have no CUDA kernel and run on the CPU); per-graph parity and
     greedy ar / blt-s / blt-d / blt-dv end to end against torch            fastblt validate --backends ort
     (the ort backend takes CUDA first and binds device tensors); greedy
     on the ort backend on cuda (device checked) byte for byte against
     torch on the CPU, lossless modes == ar; 16 requests batched == alone   (in this script)
With TensorRT as well (the graphs need TensorRT >= 10.15: opset 24):
  4. export the checkpoint (default: the embedded one) in fp32 and fp16      fastblt export --max-step
  5. parse every graph with TensorRT's ONNX parser (each graph's verdict,    (in this script)
     TensorRT's own errors for one that fails)
  6. build one engine per graph, both dtypes                                 fastblt build
  7. per-graph parity: torch vs ort, torch vs trt, ort vs trt (polygraphy),  fastblt validate
     composite gates for fp16; fp32 also end to end: greedy ar / blt-s /
     blt-d / blt-dv on ort and trt byte for byte against torch
  8. greedy lossless modes on trt: blt-s and blt-dv == ar, per dtype; in    (in this script)
     fp32 also requests batched (as many rows as the engines take) == alone
  9. fastblt bench --backends trt on the fp16 engines                        fastblt bench
and write one report: OUT/gpu_check.json and OUT/gpu_check.md (validate's and bench's own
reports in OUT/validate-*/ and OUT/bench-*/). Every check runs in a child process, so a crash
(a TensorRT abort, a segfault) is that check's failure, reported with its output, not the end of
the run. Exit 0 when every check that can run here passed (without TensorRT, steps 4-9 are
reported as not run, with the reason; without onnxruntime's CUDA provider step 3 is "skipped"),
1 when one failed or did not run. Without a CUDA device it prints one SKIP line, writes a
"skipped" report, exits 0.

Steps 1-2 ran on an H100 (docs/gpu.md); steps 3-9 have not run on a GPU yet (and the opset-24
graphs not at all: TensorRT's KVCacheUpdate is documented for a linear cache with a static
sequence dim, ours are rings and a dynamic `past`, so steps 5-6 may well fail; they say how).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUDGET_S = 560  # gpu_check.sh kills at 600 s; leave time to write the report
DTYPES = ("fp32", "fp16")
TAIL = 3000  # characters of a failed command's output kept in the report
TRT_MIN = (10, 15)  # opset 24: TensorScatter, RMSNormalization, RotaryEmbedding, 4-D Attention
SCRIPT = Path(__file__).resolve()
# TensorRT's logger lines ("[12/05/2026-12:00:00] [TRT] [E] ...") and its parser's error records
_TRT_ERROR = re.compile(r"\[TRT\] \[[EF]\]|Error Code \d|UNSUPPORTED_NODE|INVALID_NODE|ONNX parser failed")


@dataclass
class Check:
    name: str
    status: str  # "pass" | "fail" | "not run" | "skipped" (does not apply here: fails nothing)
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
        self.exports: dict[str, tuple[Check, Path]] = {}  # dtype -> its export check and directory

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
        return self.add(self.execute(name, [sys.executable, "-m", "fastblt.cli", *args], parse_json))

    def probe(self, name: str, args: list[str]) -> Check:
        """`python gpu_check.py --probe ARGS`: an in-process check run in a child process, whose
        last stdout line is {"status", "detail", "data"}; a child that dies is this check's failure."""
        check = self.execute(name, [sys.executable, str(SCRIPT), "--probe", *args], True, json_last_line=True)
        r = check.data
        if isinstance(r, dict) and r.get("status") in ("pass", "fail"):
            check.status, check.detail, check.data = r["status"], r.get("detail", ""), r.get("data")
            result = json.dumps(r, default=str)
            check.output_tail = "\n".join(ln for ln in check.output_tail.splitlines() if ln.strip() != result)
            errors = [e for e in trt_errors(check.output_tail) if e[:300] not in check.detail]
            if check.status == "fail" and errors:
                check.detail += "; TensorRT: " + " | ".join(errors[:3])
        elif check.status == "pass":
            check.status, check.detail = "fail", f"{check.detail}: the probe printed no result"
        if check.status == "pass":
            check.output_tail = ""
        return self.add(check)

    def execute(self, name: str, cmd: list[str], parse_json: bool = False, json_last_line: bool = False) -> Check:
        """Run `cmd` with the remaining budget as its timeout -> its Check (not yet added)."""
        if self.left() < 5:
            return Check(name, "not run", detail="not run: the 10-minute budget is spent")
        t0 = time.monotonic()
        try:
            p = self.spawn(cmd)
        except subprocess.TimeoutExpired as e:
            tail = (_text(e.stdout) + _text(e.stderr))[-TAIL:]
            return Check(name, "fail", time.monotonic() - t0, "timed out (budget spent)", cmd, tail)
        dt = time.monotonic() - t0
        data = _json(p.stdout, json_last_line) if parse_json else None
        ok = p.returncode == 0
        detail = "exit 0" if ok else failure_detail(p.returncode, p.stdout, p.stderr)
        keep = not ok or json_last_line or (parse_json and data is None)  # a probe's output: until it is read
        tail = (p.stdout + p.stderr)[-TAIL:] if keep else ""
        check = Check(name, "pass" if ok else "fail", dt, detail, cmd, tail, data)
        errors = trt_errors(p.stdout + p.stderr)
        if not ok and errors and data is None:
            check.data = {"trt_errors": errors}
        return check

    def spawn(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=self.left())

    @property
    def passed(self) -> bool:
        """Something passed, and everything that applies here passed ("skipped" does not apply)."""
        return any(c.status == "pass" for c in self.checks) and all(
            c.status in ("pass", "skipped") for c in self.checks
        )


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _json(stdout: str, last_line: bool) -> Any:
    text = stdout.strip()
    if last_line:
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
        text = lines[-1] if lines else ""
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def trt_errors(text: str, most: int = 6) -> list[str]:
    """TensorRT's error lines in a command's output (its logger's [E]/[F] lines, parser errors),
    first `most` distinct ones, each cut to 400 characters."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and _TRT_ERROR.search(line) and line[:400] not in out:
            out.append(line[:400])
    return out[:most]


def failure_detail(rc: int, stdout: str, stderr: str) -> str:
    """`exit N: <last line of stderr>`, the signal that killed it, and TensorRT's errors if any."""
    if rc < 0:
        try:
            head = f"exit {rc} (killed by {signal.Signals(-rc).name})"
        except ValueError:
            head = f"exit {rc} (killed by signal {-rc})"
    else:
        head = f"exit {rc}"
    detail = f"{head}: {_last_line(stderr) or _last_line(stdout)}"
    errors = [e for e in trt_errors(stdout + stderr) if e[:300] not in detail]
    if errors:
        detail += "; TensorRT: " + " | ".join(errors[:3])
    return detail


# ------------------------------------------------------------------------------ checks
def trt_version_ok(version: str) -> bool:
    """TensorRT `version` ("10.15.1.29") is at least TRT_MIN."""
    try:
        return tuple(int(x) for x in version.split(".")[:2]) >= TRT_MIN
    except ValueError:
        return False


def ort_cuda_status() -> tuple[bool, str]:
    """(onnxruntime has its CUDAExecutionProvider here, the reason either way)."""
    try:
        import onnxruntime as ort
    except Exception as e:  # noqa: BLE001 - the reason to skip
        return False, f"onnxruntime cannot be imported ({type(e).__name__}: {e})"
    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return False, (
            f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: {', '.join(providers)}); "
            "install onnxruntime-gpu for it"
        )
    return True, f"onnxruntime {ort.__version__} with CUDAExecutionProvider"


def export_once(runner: Runner, args: argparse.Namespace, dtype: str) -> tuple[Check, Path]:
    """`fastblt export` of the checkpoint in `dtype` (once per run; ort and trt share it)."""
    if dtype not in runner.exports:
        art = args.out / f"artifacts-{dtype}"
        check = runner.command(
            f"export {dtype}",
            ["export", "--checkpoint", args.checkpoint, "--out", str(art), "--dtype", dtype]
            + ["--max-step", str(args.max_step), "--max-batch", "2", "--force"],
        )
        runner.exports[dtype] = (check, art)
    return runner.exports[dtype]


def greedy_check(runner: Runner, name: str, backend: str, art: Path, args: argparse.Namespace, **kw: Any) -> Check:
    """The `greedy` probe: greedy modes on `backend` over `art` (see probe_greedy)."""
    if runner.left() < 30:
        return runner.skip(name, "not run: the 10-minute budget is spent")
    cmd = ["greedy", "--backend", backend, "--artifacts", str(art), "--checkpoint", args.checkpoint]
    cmd += ["--max-bytes", str(args.max_bytes), "--expect-device", kw.get("expect_device", "cuda")]
    if kw.get("against_torch"):
        cmd.append("--against-torch")
    return runner.probe(name, cmd)


def batch_check(
    runner: Runner, name: str, backend: str, art: Path | None, args: argparse.Namespace, **kw: Any
) -> Check:
    """The `batch` probe: requests batched on `backend` equal the same requests alone (see probe_batch)."""
    if runner.left() < 30:
        return runner.skip(name, "not run: the 10-minute budget is spent")
    cmd = ["batch", "--backend", backend, "--checkpoint", args.checkpoint, "--max-bytes", str(args.max_bytes)]
    cmd += ["--artifacts", str(art)] if art is not None else ["--device", kw.get("device", "cuda")]
    return runner.probe(name, cmd + ["--expect-device", kw.get("expect_device", "cuda")])


def lossless_on_trt(runner: Runner, dtype: str, art: Path, args: argparse.Namespace) -> Check:
    """Greedy ar, blt-s, blt-dv and blt-d on the trt backend; blt-s and blt-dv must equal ar."""
    return greedy_check(runner, f"lossless modes on trt ({dtype})", "trt", art, args)


def ort_placement(runner: Runner, art: Path) -> Check:
    """Where onnxruntime's CUDA session places each graph's nodes: one child process per graph at
    verbose logging, its log read for "kernel not found" (ops without a CUDA kernel, run on the
    CPU) and the per-provider node counts. Fails only when a session cannot be created."""
    name = "ort cuda placement (fp32)"
    t0 = time.monotonic()
    try:
        from fastblt.export.manifest import read_manifest

        graphs = read_manifest(art)["graphs"]
    except Exception as e:  # noqa: BLE001 - reported as this check's failure
        return runner.add(Check(name, "fail", time.monotonic() - t0, f"{type(e).__name__}: {e}"))
    data: dict[str, dict] = {}
    bad: dict[str, list[str]] = {}  # why -> the graphs it holds for
    notes: list[str] = []
    for step, g in graphs.items():
        if runner.left() < 10:
            return runner.skip(name, "not run: the 10-minute budget is spent")
        cmd = [sys.executable, str(SCRIPT), "--probe", "ort-session", str(art / g["file"])]
        try:
            p = runner.spawn(cmd)
        except subprocess.TimeoutExpired:
            bad.setdefault("timed out", []).append(step)
            continue
        placed = parse_placement(p.stdout + p.stderr)
        data[step] = placed
        providers = (_json(p.stdout, True) or {}).get("providers", [])
        if p.returncode != 0:
            bad.setdefault(failure_detail(p.returncode, p.stdout, p.stderr), []).append(step)
        elif "CUDAExecutionProvider" not in providers:
            why = [
                re.sub(r"^.*?(UserWarning|Error): ", "", ln.strip())[:300]
                for ln in p.stderr.splitlines()
                if re.search(r"CUDA.*(fail|not|error)", ln, re.I)
            ]
            bad.setdefault(f"the session runs on {providers} only" + (f": {why[0]}" if why else ""), []).append(step)
        elif placed["no_cuda_kernel"]:
            notes.append(f"{step}: " + ", ".join(f"{op} x{n}" for op, n in sorted(placed["no_cuda_kernel"].items())))
    dt = time.monotonic() - t0
    if bad:
        return runner.add(
            Check(name, "fail", dt, "; ".join(f"{', '.join(s)}: {why}" for why, s in bad.items()), data=data)
        )
    counts = {s: d["nodes"] for s, d in data.items() if d["nodes"]}
    if notes:
        detail = "no CUDA kernel (run on the CPU): " + "; ".join(notes)
    else:
        detail = "every op has a CUDA kernel" if counts else "onnxruntime's log named no placement"
    if counts:
        detail += "; nodes per provider: " + "; ".join(
            f"{s} " + ", ".join(f"{ep.replace('ExecutionProvider', '')} {n}" for ep, n in c.items())
            for s, c in counts.items()
        )
    return runner.add(Check(name, "pass", dt, detail, data=data))


_NO_KERNEL = re.compile(r"kernel not found in registries for Op type: (\S+)")
_PLACED = re.compile(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")


def parse_placement(log: str) -> dict:
    """onnxruntime's verbose session log -> {"no_cuda_kernel": {op: count}, "nodes": {provider: n}}."""
    missing: dict[str, int] = {}
    for op in _NO_KERNEL.findall(log):
        missing[op] = missing.get(op, 0) + 1
    nodes = {ep: int(n) for ep, n in _PLACED.findall(log)}
    return {"no_cuda_kernel": missing, "nodes": nodes}


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


# ------------------------------------------------------------------------------ probes (child processes)
def probe_greedy(a: argparse.Namespace) -> dict:
    """Greedy ar, blt-s (and blt-d, blt-dv on a BLT-D checkpoint) on `a.backend` over the export
    `a.artifacts`: the backend must compute on `a.expect_device`; blt-s and blt-dv must equal ar;
    with `a.against_torch`, every mode must equal the torch backend's on the CPU byte for byte."""
    from fastblt.runtime.generator import Generator
    from fastblt.validate.graphs import DEFAULT_PROMPTS

    gen = Generator(a.checkpoint, backend=a.backend, artifacts=a.artifacts)
    if gen.device.type != a.expect_device:
        gen.close()
        return {"status": "fail", "detail": f"the {a.backend} backend computes on {gen.device}, not {a.expect_device}"}
    config = gen.config
    modes = ["ar", "blt-s"] + (["blt-d", "blt-dv"] if config.blt_d is not None else [])
    ref = Generator(gen.model, backend="torch", device="cpu") if a.against_torch else None
    texts: dict[str, dict[str, str]] = {}
    speed: dict[str, list[float]] = {m: [0.0, 0.0] for m in modes}
    bad = []
    for i, prompt in enumerate(DEFAULT_PROMPTS):
        ids = {}
        for mode in modes:
            out = gen.generate(prompt, mode=mode, max_bytes=a.max_bytes, temperature=0.0, stop_on_eos=False)
            ids[mode] = list(out.ids)
            texts.setdefault(f"prompt {i}", {})[mode] = out.text
            speed[mode][0] += len(out.ids)
            speed[mode][1] += out.stats.wall_s
            if ref is not None:
                want = ref.generate(prompt, mode=mode, max_bytes=a.max_bytes, temperature=0.0, stop_on_eos=False)
                if list(want.ids) != ids[mode]:
                    bad.append(f"prompt {i}: {mode} != torch (cpu) from byte {_first_diff(want.ids, ids[mode])}")
        bad += [f"prompt {i}: {m} != ar" for m in ("blt-s", "blt-dv") if m in ids and ids[m] != ids["ar"]]
    gen.close()
    rates = {m: (n / s if s else 0.0) for m, (n, s) in speed.items()}
    data = {"device": str(gen.device), "modes": modes, "texts": texts, "bytes_per_s": rates}
    what = f"{len(DEFAULT_PROMPTS)} prompts x {modes} on {gen.device}" + (", == torch (cpu)" if ref else "")
    what += "; " + ", ".join(f"{m} {r:.0f} B/s" for m, r in rates.items())
    return {"status": "fail" if bad else "pass", "detail": "; ".join(bad) if bad else what, "data": data}


BATCH_REQUESTS = 16


def probe_batch(a: argparse.Namespace) -> dict:
    """16 greedy requests (ar and blt-s on varied prompts) through the batch engine on `a.backend`,
    each against the same request run alone: a request's bytes must not depend on its batch. Also
    the time of the 16 run one after another over their time batched (reported, not gated)."""
    from fastblt.runtime.batch import BatchEngine
    from fastblt.runtime.generator import Generator
    from fastblt.runtime.options import make_request
    from fastblt.validate.graphs import DEFAULT_PROMPTS

    device = {"device": a.device} if a.backend == "torch" else {"artifacts": a.artifacts}
    gen = Generator(a.checkpoint, backend=a.backend, **device)
    if gen.device.type != a.expect_device:
        gen.close()
        return {"status": "fail", "detail": f"the {a.backend} backend computes on {gen.device}, not {a.expect_device}"}
    jobs = [(f"{DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]}{' ' * (i // len(DEFAULT_PROMPTS))}", ("ar", "blt-s")[i % 2])
            for i in range(BATCH_REQUESTS)]  # fmt: skip
    options = dict(max_bytes=a.max_bytes, temperature=0.0, stop_on_eos=False)
    gen.generate(jobs[0][0], mode="ar", **options)  # warm-up: first calls, CUDA graphs
    t0 = time.perf_counter()
    alone = [list(gen.generate(p, mode=m, **options).ids) for p, m in jobs]
    t_alone = time.perf_counter() - t0
    with BatchEngine(gen.engine) as batch:
        warm = options | {"max_bytes": 4}  # the batch's own shapes (and CUDA graphs) once, untimed
        for t in [batch.submit(make_request(p, gen.config, m, **warm)) for p, m in jobs]:
            t.result(300)
        t0 = time.perf_counter()
        tickets = [batch.submit(make_request(p, gen.config, m, **options)) for p, m in jobs]
        batched = [list(t.result(300).ids) for t in tickets]
        t_batch = time.perf_counter() - t0
        rows = batch.max_batch
        per_call = {s: batch.stats.rows[s] / max(batch.stats.calls[s], 1) for s in batch.stats.calls}
    gen.close()
    bad = [f"request {i} ({m}): from byte {_first_diff(x, y)}"
           for i, ((_, m), x, y) in enumerate(zip(jobs, alone, batched, strict=True)) if x != y]  # fmt: skip
    speedup = t_alone / t_batch if t_batch else 0.0
    data = {"device": str(gen.device), "max_batch": rows, "requests": len(jobs), "differ": len(bad),
            "alone_s": t_alone, "batched_s": t_batch, "speedup": speedup, "rows_per_call": per_call}  # fmt: skip
    what = f"{len(jobs)} requests (ar, blt-s) at max_batch {rows} on {gen.device}: "
    if bad:
        return {"status": "fail", "detail": what + f"{len(bad)} differ from alone: " + "; ".join(bad[:4]), "data": data}
    return {"status": "pass", "detail": what + f"all equal alone; batched {speedup:.1f}x faster", "data": data}


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))


def probe_trt_parse(a: argparse.Namespace) -> dict:
    """Every graph of the export through TensorRT's ONNX parser (no engine build): per graph its
    layer count and layer types, or TensorRT's errors."""
    from fastblt.engines.trt.build import EngineBuildError, NetworkFromOnnxPath, require_tensorrt
    from fastblt.engines.trt.profiles import graph_inputs
    from fastblt.export.manifest import read_manifest

    trt = require_tensorrt()
    manifest = read_manifest(a.artifacts)
    data: dict[str, Any] = {"tensorrt": trt.__version__}
    failed = []
    for step, g in manifest["graphs"].items():
        inputs = [t.name for t in graph_inputs(manifest, step)]
        try:
            _builder, network, _parser = NetworkFromOnnxPath(Path(a.artifacts) / g["file"], inputs)()
        except EngineBuildError as e:
            data[step] = {"parsed": False, "error": str(e)}
            failed.append(f"{step}: {str(e).split(': ', 1)[-1]}")
            continue
        types: dict[str, int] = {}
        for i in range(network.num_layers):
            t = str(network.get_layer(i).type).rsplit(".", 1)[-1]
            types[t] = types.get(t, 0) + 1
        data[step] = {"parsed": True, "layers": network.num_layers, "layer_types": types}
    old = "" if trt_version_ok(trt.__version__) else f" (TensorRT {trt.__version__} < 10.15: opset 24 needs 10.15)"
    if failed:
        return {"status": "fail", "detail": "; ".join(failed)[:1500] + old, "data": data}
    n = {s: d["layers"] for s, d in data.items() if isinstance(d, dict)}
    return {"status": "pass", "detail": f"TensorRT {trt.__version__} parsed every graph: {n} layers", "data": data}


def probe_ort_session(path: str) -> int:
    """A CUDA-first onnxruntime session for one graph at verbose logging (its log is the output)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(0)
    options = ort.SessionOptions()
    options.log_severity_level = 0
    session = ort.InferenceSession(path, options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    print(json.dumps({"providers": session.get_providers()}), flush=True)
    return 0


def probe_main(argv: list[str]) -> int:
    """`gpu_check.py --probe KIND ...`: one in-process check; prints its result as the last line."""
    ap = argparse.ArgumentParser(prog="gpu_check.py --probe")
    ap.add_argument("kind", choices=("greedy", "batch", "trt-parse", "ort-session"))
    ap.add_argument("path", nargs="?")
    ap.add_argument("--artifacts", type=Path)
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--backend", choices=("torch", "ort", "trt"), default="trt")
    ap.add_argument("--device", default="cuda", help="the torch backend's device")
    ap.add_argument("--max-bytes", type=int, default=24)
    ap.add_argument("--expect-device", default="cuda")
    ap.add_argument("--against-torch", action="store_true")
    a = ap.parse_args(argv)
    if a.kind == "ort-session":
        return probe_ort_session(a.path)
    try:
        probes = {"greedy": probe_greedy, "batch": probe_batch, "trt-parse": probe_trt_parse}
        result = probes[a.kind](a)
    except Exception as e:  # noqa: BLE001 - a crash is this check's failure, reported with its message
        result = {"status": "fail", "detail": f"{type(e).__name__}: {e}"[:1500]}
    print(json.dumps(result, default=str), flush=True)
    return 0


# ------------------------------------------------------------------------------ report
def environment() -> dict[str, Any]:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
        if not trt_version_ok(tensorrt.__version__):
            env["tensorrt"] += " (older than 10.15: the opset-24 graphs need 10.15)"
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        env["tensorrt"] = f"not importable: {e}"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        import onnxruntime

        env["onnxruntime"] = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
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
    val += ["--max-step", str(args.max_step), "--max-bytes", str(args.max_bytes)]
    val += ["--report", str(args.out / "validate-cuda"), "--json", "--force"]
    validate_summary(runner.command("parity torch on cuda (fp32)", val, parse_json=True))
    batch_check(runner, "batched = alone, torch on cuda", "torch", None, args)
    bench = ["bench", "--checkpoint", args.checkpoint, "--backends", "torch", "--device", "cuda", "--no-hf", "--json"]
    bench_summary(runner.command("bench torch on cuda", bench + ["--out", str(args.out / "bench-cuda")], True))
    eager = bench + ["--no-cuda-graphs", "--no-comparison", "--out", str(args.out / "bench-cuda-eager")]
    bench_summary(runner.command("bench torch on cuda, eager", eager, parse_json=True))


ORT_CHECKS = (
    "ort cuda placement (fp32)",
    "parity ort on cuda (fp32)",
    "greedy on ort (cuda)",
    "batched = alone, ort on cuda",
)


def ort_cuda_checks(runner: Runner, args: argparse.Namespace) -> None:
    """onnxruntime's CUDAExecutionProvider on the fp32 export: node placement, per-graph parity and
    every mode end to end against torch (validate), greedy on the ort backend on cuda vs torch."""
    ok, why = ort_cuda_status()
    if not ok:
        for name in ORT_CHECKS:
            runner.add(Check(name, "skipped", detail=why))
        return
    exp, art = export_once(runner, args, "fp32")
    if exp.status != "pass":
        for name in ORT_CHECKS:
            runner.skip(name, "not run: export fp32 failed")
        return
    ort_placement(runner, art)
    val = ["validate", "--checkpoint", args.checkpoint, "--artifacts", str(art), "--backends", "ort"]
    val += ["--max-bytes", str(args.max_bytes), "--report", str(args.out / "validate-ort-cuda"), "--json", "--force"]
    validate_summary(runner.command("parity ort on cuda (fp32)", val, parse_json=True))
    greedy_check(runner, "greedy on ort (cuda)", "ort", art, args, against_torch=True)
    batch_check(runner, "batched = alone, ort on cuda", "ort", art, args)


def trt_checks(runner: Runner, args: argparse.Namespace) -> None:
    arts = {}
    for dtype in DTYPES:
        exp, art = export_once(runner, args, dtype)
        arts[dtype] = art
        later = (f"trt parse ({dtype})", f"build {dtype}", f"parity ({dtype})", f"lossless modes on trt ({dtype})")
        later += (f"batched = alone, trt ({dtype})",) if dtype == "fp32" else ()
        if exp.status != "pass":
            for what in later:
                runner.skip(what, f"not run: export {dtype} failed")
            continue
        parse = runner.probe(f"trt parse ({dtype})", ["trt-parse", "--artifacts", str(art)])
        if parse.status != "pass":
            for what in later[1:]:
                runner.skip(what, f"not run: TensorRT could not parse the {dtype} graphs")
            continue
        build = runner.command(
            f"build {dtype}",
            ["build", "--artifacts", str(art), "--max-batch", "2", "--json"]
            + ["--timing-cache", str(args.out / "timing.cache")],
            parse_json=True,
        )
        if build.status != "pass":
            for what in later[2:]:
                runner.skip(what, f"not run: build {dtype} failed")
            continue
        val = ["validate", "--checkpoint", args.checkpoint, "--artifacts", str(art), "--backends", "ort,trt"]
        val += ["--max-bytes", str(args.max_bytes), "--report", str(args.out / f"validate-{dtype}"), "--json"]
        val.append("--force")  # a rerun into the same --out replaces the earlier report
        if dtype != "fp32":
            val.append("--no-e2e")  # reduced precision: composite gates per graph; bytes are compared in fp32
        parity = runner.command(f"parity ({dtype})", val, parse_json=True)
        validate_summary(parity)
        lossless_on_trt(runner, dtype, art, args)
        if dtype == "fp32":  # as many rows as the engines take (fastblt build --max-batch 2 above)
            batch_check(runner, "batched = alone, trt (fp32)", "trt", art, args)
    builds = [c for c in runner.checks if c.name.startswith("build")]
    if builds and all(c.status == "pass" for c in builds) and len(builds) == len(DTYPES):
        bench = ["bench", "--checkpoint", args.checkpoint, "--backends", "trt", "--artifacts", str(arts["fp16"])]
        bench += ["--no-hf", "--out", str(args.out / "bench-trt"), "--json"]
        bench_summary(runner.command("bench trt (fp16)", bench, parse_json=True))
    else:
        runner.skip("bench trt (fp16)", "not run: an engine build failed or did not run")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return probe_main(argv[1:])
    from fastblt.export.spec import DEFAULT_MAX_STEP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--max-step", type=int, default=DEFAULT_MAX_STEP, help="positions per step call (export)")
    ap.add_argument("--max-context", type=int, default=None, help=argparse.SUPPRESS)  # no capacities any more
    ap.add_argument("--max-bytes", type=int, default=24)
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for every check together")
    args = ap.parse_args(argv)
    if args.max_context is not None:
        print(f"gpu_check: note: --max-context is no longer used (caches follow the context); "
              f"ignoring {args.max_context}", file=sys.stderr)  # fmt: skip

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
    ort_cuda_checks(runner, args)
    note = ""
    if status.available:
        trt_checks(runner, args)
    else:
        note = f"TensorRT is not usable here ({status.reason}): its checks did not run."
        print(f"gpu_check: SKIP trt: {note}", flush=True)
    skipped = [c for c in runner.checks if c.status == "skipped"]
    if skipped:
        note = (note + " " if note else "") + f"onnxruntime on CUDA did not run: {skipped[0].detail}."
    verdict = "pass" if runner.passed else "fail"
    jpath, mpath = write_report(args.out, verdict, env, runner.checks, note)
    failed = [c.name for c in runner.checks if c.status not in ("pass", "skipped")]
    ran = len(runner.checks) - len(skipped)
    print(
        f"gpu_check: {verdict.upper()}: {ran - len(failed)}/{ran} checks passed"
        + (f" ({len(skipped)} skipped)" if skipped else "")
        + (f"; failed or not run: {', '.join(failed)}" if failed else "")
        + f". Report: {jpath}, {mpath}"
    )
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
