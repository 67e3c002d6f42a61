"""The runtime benchmark: every mode x backend on fixed prompts, plus the Hugging Face peer.

Measured (batch 1, `max_bytes` new bytes per prompt, EOS ignored so every row makes the same
number of bytes): decode bytes/s (prefill excluded), per-byte latency, passes per module per
byte, acceptance, Eq. 8 traffic (this checkpoint, projected on BLT 1B / 3B), host vs backend
time, and agreement with greedy ar. The peer is transformers' `BltForCausalLM.generate` with
use_cache=False (a full recompute per byte) on the same weights. Warm-up calls are excluded.
Rows run prompt by prompt with the modes interleaved, so load from other processes on a shared
machine falls on every mode alike. `fastblt bench` prints and saves the result (bench_cli.py).
"""

from __future__ import annotations

import importlib.util
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastblt.errors import InputError
from fastblt.runtime.generator import Generator

BENCH_FILES = ("sched.py", "concurrent/futures/process.py", "lib2to3/pgen2/parse.py")  # held-out files
PROMPT_BYTES = 1000
TARGETS = {"ar_vs_hf": 50.0, "blt-s": 1.5, "blt-dv": 1.8, "blt-d": 3.0, "eq8_reduction": 0.75, "host_fraction": 0.25}


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str
    options: dict = field(default_factory=dict)
    main: bool = True  # in the mode x backend table; False: the block-start / drafting comparison


VARIANTS = (
    Variant("ar", "ar"),
    Variant("blt-s", "blt-s"),  # k 16, greedy rounds drafted from the context where it repeats (the defaults)
    Variant("blt-dv", "blt-dv"),  # one-step drafting, "patch" block start
    Variant("blt-d", "blt-d"),  # confidence alpha 0.7, "force" block start
    Variant("blt-d/patch", "blt-d", {"block_start": "patch"}, main=False),
    Variant("blt-d/entropy", "blt-d", {"unmask": "entropy"}, main=False),
    Variant("blt-dv/force", "blt-dv", {"block_start": "force"}, main=False),
    Variant("blt-dv/alpha0.3", "blt-dv", {"unmask": "confidence"}, main=False),
    Variant("blt-dv/alpha0.3/force", "blt-dv", {"unmask": "confidence", "block_start": "force"}, main=False),
    Variant("blt-s/k4", "blt-s", {"k": 4}, main=False),
    Variant("blt-s/k8", "blt-s", {"k": 8}, main=False),
    Variant("blt-s/lookup0", "blt-s", {"lookup": 0}, main=False),  # the paper's drafters alone
    Variant("blt-dv/lookup0", "blt-dv", {"lookup": 0}, main=False),
)


def bench_prompts(n: int, prompt_bytes: int = PROMPT_BYTES) -> list[tuple[str, bytes]]:
    """Fixed prompts: from held-out stdlib files, the `prompt_bytes` bytes that end right after
    the first method header ("\\n    def ") past that offset (the model goes on with its name).

    BENCH_FILES first; files this Python lacks (lib2to3 is gone from 3.13, and from some 3.12
    builds) are replaced by the next held-out files, in the committed list's order."""
    from fastblt.train.corpus import read_heldout_list, stdlib_dir

    root = stdlib_dir()
    names = [f for f in dict.fromkeys([*BENCH_FILES, *read_heldout_list()]) if (root / f).is_file()]
    if len(names) < n:
        raise InputError(f"{root}: only {len(names)} of the held-out files exist here; the bench needs {n}")
    out = []
    for name in names[:n]:
        data = (root / name).read_bytes()
        end = data.find(b"\n    def ", prompt_bytes)
        end = len(data) if end < 0 else end + len(b"\n    def ")
        out.append((name, data[max(0, end - prompt_bytes) : end]))
    return out


def _agreement(ids: list[int], ref: list[int]) -> tuple[float, float]:
    """(common prefix / len, positional matches / len) of ids against the reference ids."""
    n = max(len(ref), 1)
    prefix = next((i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b), min(len(ids), len(ref)))
    return prefix / n, sum(a == b for a, b in zip(ids, ref, strict=False)) / n


def ar_bits_per_byte(model, prompt: bytes, ids: list[int]) -> float:
    """Bits per byte the model (full forward, causal decoder) assigns to the generated ids."""
    from fastblt.model.tokenizer import encode

    ctx = encode(prompt)
    tokens = torch.tensor([ctx + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens)[0, len(ctx) - 1 : -1].float(), -1)
    nll = -logp.gather(1, torch.tensor(ids).view(-1, 1)).sum()
    return float(nll) / max(len(ids), 1) / float(np.log(2))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _row(name: str, backend: str, variant: Variant, gens: list, ar_ids: list[list[int]] | None) -> dict:
    st = [g.stats for g in gens]
    total = sum(s.generated for s in st)
    decode = sum(s.decode_s for s in st)
    passes: dict[str, int] = {}
    for s in st:
        for m, v in s.passes.items():
            passes[m] = passes.get(m, 0) + v
    drafted, accepted = sum(s.drafted for s in st), sum(s.accepted for s in st)
    eq8 = {
        split: {
            key: sum(s.eq8[split][key] * s.generated for s in st) / max(total, 1)
            for key in ("bytes_per_byte", "bytes_per_byte_with_entropy")
        }
        for split in st[0].eq8
    }
    row = {
        "name": name,
        "mode": variant.mode,
        "options": variant.options,
        "backend": backend,
        "prompts": len(gens),
        "bytes": total,
        "bytes_per_s": total / decode if decode > 0 else 0.0,
        "ms_per_byte": 1e3 * decode / max(total, 1),
        "latency_p50_ms": 1e3 * float(np.mean([s.latency_p50_s for s in st])),
        "latency_p95_ms": 1e3 * float(np.mean([s.latency_p95_s for s in st])),
        "ttfb_ms": 1e3 * float(np.mean([s.ttfb_s for s in st])),
        "passes_per_byte": {m: v / max(total, 1) for m, v in passes.items()},
        "acceptance": accepted / drafted if drafted else None,
        "accept_hist": _sum_hists([s.accept_hist for s in st]),
        "unmask_steps": _sum_hists([s.unmask_steps for s in st]),
        "block_start_fallbacks": sum(s.block_start_fallbacks for s in st),
        "rounds": sum(s.rounds for s in st),
        "lookup_rounds": sum(s.lookup_rounds for s in st),
        "lookup_acceptance": _ratio(sum(s.lookup_accepted for s in st), sum(s.lookup_drafted for s in st)),
        "eq8": eq8,
        "host_fraction": sum(s.host_s for s in st) / sum(s.wall_s for s in st),
        "decode_host_fraction": 1 - sum(s.decode_backend_s for s in st) / decode if decode > 0 else 0.0,
        "wall_s": sum(s.wall_s for s in st),
        "per_prompt": [{"bytes": s.generated, "decode_s": s.decode_s} for s in st],
    }
    if ar_ids is not None:
        agree = [_agreement(g.ids, ref) for g, ref in zip(gens, ar_ids, strict=True)]
        row["identical_to_ar"] = all(g.ids == ref for g, ref in zip(gens, ar_ids, strict=True))
        row["ar_prefix_agreement"] = float(np.mean([a for a, _ in agree]))
        row["ar_positional_agreement"] = float(np.mean([b for _, b in agree]))
    return row


def _sum_hists(hists: list[dict]) -> dict:
    out: dict = {}
    for h in hists:
        for k, v in h.items():
            out[int(k)] = out.get(int(k), 0) + v
    return dict(sorted(out.items()))


@dataclass
class BenchConfig:
    checkpoint: str = "default"
    backends: tuple[str, ...] = ("ort", "torch")
    max_bytes: int = 256
    prompts: int = 3
    max_context: int | None = None  # None: the Generator's default (the model's position limit)
    threads: int | None = None  # None: every backend's default (what a user gets)
    hf: bool = True
    hf_prompts: int = 1
    comparison: bool = True  # the block-start / drafting variants (on the first backend)
    cache_dir: str | None = None
    device: str | None = None  # torch / trt backends (ort runs where its providers run)
    artifacts: str | None = None  # trt: the export with its engines (ort exports into the cache itself)
    cuda_graphs: bool | None = None  # torch on CUDA (None: on)


def check_runnable(cfg: BenchConfig) -> None:
    """Refuse, before any measurement, a run that would stop partway: a requested backend that
    cannot run here (BackendUnavailable, with the reason), a device that is not here, trt without
    its engines, the peer without transformers. Otherwise the backends before it are measured for
    minutes and then thrown away."""
    from fastblt.engines.base import resolve_device
    from fastblt.engines.registry import backend_factory

    for name in cfg.backends:
        backend_factory(name)  # InputError if unknown, BackendUnavailable if it cannot run here
    if cfg.device is not None and any(b != "ort" for b in cfg.backends):
        resolve_device(cfg.device)
    if "trt" in cfg.backends and cfg.artifacts is None:
        raise InputError("bench backend trt: needs --artifacts DIR with built engines (see `fastblt build`)")
    if cfg.hf and importlib.util.find_spec("transformers") is None:
        raise InputError("bench HF peer: transformers is not installed (install it, or pass --no-hf)")


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every variant on every backend (+ the HF peer); returns the result record."""
    check_runnable(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    prompts = bench_prompts(cfg.prompts)
    result: dict = {"meta": _meta(cfg, prompts), "rows": [], "hf": None}
    model = None
    ar_by_backend: dict[str, list[list[int]]] = {}
    for bi, backend in enumerate(cfg.backends):
        log(f"[{backend}] starting (first use may export the graphs)")
        t0 = time.perf_counter()
        g = Generator(
            cfg.checkpoint,
            backend=backend,
            max_context=cfg.max_context,
            threads=cfg.threads,
            cache_dir=cfg.cache_dir,
            device=cfg.device if backend != "ort" else None,
            artifacts=cfg.artifacts if backend == "trt" else None,
            cuda_graphs=cfg.cuda_graphs if backend == "torch" else None,
        )
        label = _device_label(g.device)
        if backend == "torch" and g.device.type == "cuda":
            label += ", CUDA graphs" if g.engine.backend.graphs is not None else ", eager"
        result["meta"].setdefault("devices", {})[backend] = label
        result["meta"].setdefault("backend_setup_s", {})[backend] = time.perf_counter() - t0
        model = g.model
        variants = [v for v in VARIANTS if v.main or (cfg.comparison and bi == 0)]
        variants = [v for v in variants if g.config.blt_d is not None or v.mode not in ("blt-d", "blt-dv")]
        for v in variants:  # warm-up, excluded
            g.generate(prompts[0][1], mode=v.mode, max_bytes=16, stop_on_eos=False, **v.options)
        gens: dict[str, list] = {v.name: [] for v in variants}
        for name, prompt in prompts:
            for v in variants:
                gens[v.name].append(
                    g.generate(prompt, mode=v.mode, max_bytes=cfg.max_bytes, stop_on_eos=False, **v.options)
                )
            log(
                f"[{backend}] {name}: "
                + ", ".join(f"{v.name} {gens[v.name][-1].stats.bytes_per_s:.0f} B/s" for v in variants)
            )
        ar_ids = [x.ids for x in gens["ar"]]
        ar_by_backend[backend] = ar_ids
        for v in variants:
            row = _row(v.name, backend, v, gens[v.name], ar_ids)
            if bi == 0:
                row["ar_bits_per_byte"] = float(
                    np.mean(
                        [ar_bits_per_byte(model, p, x.ids) for (_, p), x in zip(prompts, gens[v.name], strict=True)]
                    )
                )
            result["rows"].append(row)
        g.close()
    if cfg.hf and model is not None:
        result["hf"] = _hf_peer(cfg, model, prompts[: cfg.hf_prompts], ar_by_backend, log)
    result["targets"] = evaluate_targets(result)
    return result


def _hf_peer(cfg: BenchConfig, model, prompts, ar_by_backend: dict, log: Callable[[str], None]) -> dict:
    from fastblt.model.tokenizer import encode
    from fastblt.validate.hf import ATTACHED_NORM, hf_model, quiet_transformers

    hf = hf_model(model, _checkpoint_dir(cfg.checkpoint))
    rows = []
    for i, (name, prompt) in enumerate(prompts):
        tokens = torch.tensor([encode(prompt)])
        log(f"[hf] {name}: {cfg.max_bytes} bytes, full recompute per byte (slow)")
        with torch.no_grad(), quiet_transformers():
            t0 = time.perf_counter()
            out = hf.generate(
                tokens,
                max_new_tokens=cfg.max_bytes,
                do_sample=False,
                use_cache=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            dt = time.perf_counter() - t0
        ids = out[0, tokens.shape[1] :].tolist()
        same = {b: ids == ar[i] for b, ar in ar_by_backend.items()}
        rows.append({"prompt": name, "bytes": len(ids), "seconds": dt, "identical_to_ar": same})
    total, secs = sum(r["bytes"] for r in rows), sum(r["seconds"] for r in rows)
    return {
        "name": "hf BltForCausalLM.generate(use_cache=False)"
        + (f" + {ATTACHED_NORM}" if model.config.decoder_input_norm else ""),
        "transformers": _version("transformers"),
        "prompts": rows,
        "bytes_per_s": total / secs if secs else 0.0,
        "identical_to_ar": {b: all(r["identical_to_ar"][b] for r in rows) for b in ar_by_backend},
    }


def evaluate_targets(result: dict) -> list[dict]:
    """The issue's targets, each with the measured value, pass/fail and (when failed) a reason slot."""
    rows = {(r["name"], r["backend"]): r for r in result["rows"]}
    out = []
    hf = result.get("hf")
    if hf and ("ar", "ort") in rows:
        # the peer ran on the first hf_prompts prompts; compare ar on those same prompts
        ar_bps = _ar_bps_on(result, "ort", len(hf["prompts"]))
        ratio = ar_bps / hf["bytes_per_s"] if hf["bytes_per_s"] else float("inf")
        out.append(
            _target(
                "ar on ort vs HF peer (bytes/s)", ratio, TARGETS["ar_vs_hf"], ">=", hf["identical_to_ar"].get("ort")
            )
        )
    for backend in sorted({b for _, b in rows}):
        ar = rows.get(("ar", backend))
        if ar is None:
            continue
        for mode in ("blt-s", "blt-dv", "blt-d"):
            r = rows.get((mode, backend))
            if r is None:
                continue
            lossless = r.get("identical_to_ar") if mode != "blt-d" else None
            out.append(_target(f"{mode} vs ar on {backend} (bytes/s)", r["bytes_per_s"] / ar["bytes_per_s"],
                               TARGETS[mode], ">=", lossless))  # fmt: skip
        if backend == "ort":
            out.append(
                _target("host share of wall time, ar on ort", ar["host_fraction"], TARGETS["host_fraction"], "<=")
            )
    first = result["rows"][0]["backend"] if result["rows"] else None
    ar, d = rows.get(("ar", first)), rows.get(("blt-d", first))
    if ar and d:
        for split in ("this", "blt-1b", "blt-3b"):
            red = 1 - d["eq8"][split]["bytes_per_byte"] / ar["eq8"][split]["bytes_per_byte"]
            out.append(
                _target(f"blt-d Eq. 8 traffic per byte reduction vs ar ({split})", red, TARGETS["eq8_reduction"], ">=")
            )
    return out


def _ar_bps_on(result: dict, backend: str, n: int) -> float:
    """ar's bytes/s on the first n prompts (the ones the peer ran)."""
    row = next(r for r in result["rows"] if r["name"] == "ar" and r["backend"] == backend)
    first = row["per_prompt"][:n]
    return sum(p["bytes"] for p in first) / sum(p["decode_s"] for p in first)


def _target(what: str, value: float, bound: float, op: str, lossless: bool | None = None) -> dict:
    ok = value >= bound if op == ">=" else value <= bound
    if lossless is False:
        ok = False
    return {"target": what, "value": value, "bound": f"{op} {bound}", "lossless": lossless, "met": bool(ok)}


def _checkpoint_dir(name: str) -> Path:
    from fastblt.formats.checkpoint import resolve_checkpoint_path

    return resolve_checkpoint_path(name)


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:  # noqa: BLE001 - only a label
        return None


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _meta(cfg: BenchConfig, prompts: list[tuple[str, bytes]]) -> dict:
    import onnxruntime

    from fastblt.version import __version__

    return {
        "command": "fastblt bench --json",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": __import__("os").cpu_count(),
        "load_avg_at_start": __import__("os").getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "fastblt": __version__,
        "checkpoint": cfg.checkpoint,
        "threads": cfg.threads,
        "max_context": cfg.max_context,
        "max_bytes": cfg.max_bytes,
        "batch": 1,
        "prompts": [{"file": n, "bytes": len(p)} for n, p in prompts],
        "hf_prompts": cfg.hf_prompts,
    }
