"""Export time, peak memory, file sizes and op counts per graph, for the default checkpoint and
a BLT-1B-shaped config with random weights (not part of the test suite: the 1B export writes
~18 GiB in fp32 and takes minutes).

    python benchmarks/export_bench.py --config 1b --dtype fp32      # BLT-1B shapes, random weights
    python benchmarks/export_bench.py --config default               # the embedded checkpoint
    python benchmarks/export_bench.py --config tiny                  # tiny_config(), random weights

Random-weight models live on the meta device and only the graph being exported gets real
weights (`fastblt.export.graphs.step_parameter_names` + `materialized`), so the peak is set by
the largest graph (the encoder's hash embeddings: 6 x 500002 x 1024), not the whole model.
Peak RSS per phase is Linux's VmHWM, reset before each phase through /proc/self/clear_refs.
Results: benchmarks/results/export_<config>_<dtype>.{json,md}; the export itself goes to --out
(default: a temporary directory, removed afterwards unless --keep).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastblt.export.exporter import DTYPES, ExportOptions, export_model
from fastblt.export.graphs import materialized, step_parameter_names
from fastblt.export.spec import TORCH_DTYPES
from fastblt.model.blt import BltModel
from fastblt.model.config import blt_1b_config, tiny_config

RESULTS = Path(__file__).parent / "results"
GiB, MiB = 1 << 30, 1 << 20


def _vm(field: str) -> int:
    """A VmXXX field of /proc/self/status in bytes (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class PhaseMeter:
    """Progress callback: time and peak RSS of each graph's export and check phases."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self._t = 0.0

    def __call__(self, event: str, step: str, i: int, total: int, entry: dict | None) -> None:
        now = time.perf_counter()
        if event == "start":
            self.rows[step] = {"rss_before_gib": _vm("VmRSS") / GiB}
        elif event == "exported":
            self.rows[step]["random_init_s"] = INIT_SECONDS[0]
            INIT_SECONDS[0] = 0.0
            self.rows[step]["export_wall_s"] = now - self._t - self.rows[step]["random_init_s"]
            self.rows[step]["export_peak_rss_gib"] = _vm("VmHWM") / GiB
        else:
            row = self.rows[step]
            row["check_wall_s"] = now - self._t
            row["check_peak_rss_gib"] = _vm("VmHWM") / GiB
            row["onnx_bytes"] = entry["bytes"]
            row["initializer_bytes"] = entry["initializer_bytes"]
            row["nodes"] = entry["nodes"]
            row["op_types"] = len(entry["op_counts"])
            row["external_data"] = entry["external_data"] is not None
            row["checks"] = {k: v["status"] for k, v in entry["checks"].items()}
            print(
                f"[{i + 1}/{total}] {step:<13} export {row['export_wall_s']:7.1f} s "
                f"(peak {row['export_peak_rss_gib']:5.2f} GiB), checks {row['check_wall_s']:6.2f} s "
                f"(peak {row['check_peak_rss_gib']:5.2f} GiB), {row['onnx_bytes'] / GiB:6.2f} GiB, "
                f"{row['nodes']} nodes, checks {row['checks']}",
                flush=True,
            )
        _reset_peak()
        self._t = time.perf_counter()


INIT_SECONDS = [0.0]  # time spent drawing random weights since the last "exported" event


def _random_init(dtype: torch.dtype):
    def make(name: str, meta: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        t = torch.empty(meta.shape, dtype=dtype)
        t = t.fill_(1.0) if name.endswith("norm.weight") or "norm_" in name else t.normal_(0.0, 0.02)
        INIT_SECONDS[0] += time.perf_counter() - t0
        return t

    return make


def run(config_name: str, dtype: str, capacity: int, patch_capacity: int, out: Path | None, keep: bool) -> dict:
    options = ExportOptions(dtype=dtype, capacity=capacity, patch_capacity=patch_capacity)
    torch_dtype = TORCH_DTYPES[options.dtype]
    step_weights = None
    t0 = time.perf_counter()
    if config_name == "default":
        from fastblt.formats.checkpoint import checkpoint_hash, load_checkpoint

        model, ckpt_hash = load_checkpoint("default", dtype=torch_dtype), checkpoint_hash("default")
    else:
        config = blt_1b_config() if config_name == "1b" else tiny_config()
        with torch.device("meta"):
            model = BltModel(config).to(torch_dtype).eval()
        specs = options.specs(config)
        make = _random_init(torch_dtype)

        def step_weights(step: str):
            return materialized(model, step_parameter_names(model, specs[step]), make)

        ckpt_hash = f"random-{config_name}"
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    tmp = Path(tempfile.mkdtemp(prefix="fastblt-export-bench-")) if out is None else None
    target = out or tmp / "export"
    meter = PhaseMeter()
    _reset_peak()
    try:
        result = export_model(
            model, target, options, checkpoint_hash=ckpt_hash, checkpoint_source=config_name, force=True,
            progress=meter, step_weights=step_weights,
        )  # fmt: skip
        total_bytes = sum(f.stat().st_size for f in target.iterdir())
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "config": config_name,
        "dtype": options.dtype,
        "capacity": options.capacity,
        "patch_capacity": options.patch_capacity,
        "params": params,
        "model_setup_s": load_s,
        "total_s": result.seconds,
        "total_bytes": total_bytes,
        # clear_refs also resets ru_maxrss, so the process peak is the largest phase peak
        "process_peak_rss_gib": max(
            [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB]
            + [g[k] for g in meter.rows.values() for k in ("export_peak_rss_gib", "check_peak_rss_gib")]
        ),
        "graphs": meter.rows,
        "versions": result.manifest["versions"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(),
            "mem_total_gib": _meminfo("MemTotal") / GiB,
        },  # fmt: skip
        "command": "python " + " ".join(sys.argv),
    }


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"### export: {r['config']} ({r['params'] / 1e9:.3f} B params), {r['dtype']}, "
        f"capacity {r['capacity']}, patch capacity {r['patch_capacity']}",
        "",
        f"`{r['command']}` — torch {r['versions']['torch']}, onnx {r['versions']['onnx']}, "
        f"onnxruntime {r['versions']['onnxruntime']}; {r['machine']['cores']} threads, "
        f"{r['machine']['mem_total_gib']:.0f} GiB RAM",
        "",
        "| graph | export s | peak RSS export GiB | checks s | peak RSS checks GiB | files MiB | ext. data | nodes |"
        " op types | random init s |",
        "|---|---:|---:|---:|---:|---:|:-:|---:|---:|---:|",
    ]
    for step, g in r["graphs"].items():
        lines.append(
            f"| {step} | {g['export_wall_s']:.1f} | {g['export_peak_rss_gib']:.2f} | {g['check_wall_s']:.2f} | "
            f"{g['check_peak_rss_gib']:.2f} | {g['onnx_bytes'] / MiB:.1f} | {'yes' if g['external_data'] else 'no'} | "
            f"{g['nodes']} | {g['op_types']} | {g['random_init_s']:.1f} |"
        )
    lines += [
        "",
        "export s excludes drawing the random weights (last column); checks s: onnx.checker full_check, I/O vs "
        "spec, TensorRT op list, hash ids, onnxruntime CPU load, sha256.",
        "",
        f"Total {r['total_s']:.1f} s (+ {r['model_setup_s']:.1f} s model setup), {r['total_bytes'] / GiB:.2f} GiB "
        f"on disk, process peak RSS {r['process_peak_rss_gib']:.2f} GiB.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=("default", "tiny", "1b"), default="1b")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--max-patches", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None, help="keep the export here (default: temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary export directory")
    args = ap.parse_args()
    r = run(args.config, args.dtype, args.max_context, args.max_patches, args.out, args.keep)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"export_{args.config}_{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    table = markdown(r)
    stem.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
