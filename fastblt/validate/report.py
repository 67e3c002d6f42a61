"""The parity report: structured data indexed by (reference, candidate) pair, then graph, then output.

Every compared thing is an entry with `passed`, `summary()`, `failed_gates()` and `to_dict()`:
an `OutputResult` (metrics.py) for a tensor, a `SequenceResult` (e2e.py, hf.py) for generated
bytes. Each entry sits at `report.results[(ref, cand)][graph][output][case]`; graphs are step
names ("decoder"), end-to-end modes ("e2e/blt-s") or Hugging Face checks ("hf/logits").

`bool(report)` is the verdict: at least one entry compared, every entry passed, and no check
that should have run raised. Backends that could not run are `skipped` with their reason: they
are neither passed nor failed, and the CLI exits 3 when they are the only problem.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastblt.errors import InputError

PLOT_FILE = "error_per_layer.png"
REPORT_FILES = ("report.json", "report.md", PLOT_FILE)  # what `Report.save` writes


class Entry(Protocol):
    @property
    def passed(self) -> bool: ...

    def summary(self) -> str: ...

    def failed_gates(self) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Skip:
    """A backend (or a check) that did not run, and why."""

    what: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"what": self.what, "reason": self.reason}


def pair_key(pair: tuple[str, str]) -> str:
    return f"{pair[0]} vs {pair[1]}"


@dataclass
class Report:
    """Parity results. See the module docstring for the layout and the verdict."""

    meta: dict[str, Any] = field(default_factory=dict)
    results: dict[tuple[str, str], dict[str, dict[str, dict[str, Entry]]]] = field(default_factory=dict)
    layers: dict[tuple[tuple[str, str], str], Any] = field(default_factory=dict)  # (pair, graph) -> LayerResult
    skipped: list[Skip] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # checks that raised instead of comparing

    # ---------------------------------------------------------------- building
    def add(self, pair: tuple[str, str], graph: str, output: str, case: str, entry: Entry) -> None:
        cases = self.results.setdefault(pair, {}).setdefault(graph, {}).setdefault(output, {})
        if case in cases:
            raise ValueError(f"report: {pair_key(pair)} | {graph} | {output} | {case} added twice")
        cases[case] = entry

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append(Skip(what, reason))

    def error(self, message: str) -> None:
        self.errors.append(message)

    def merge(self, other: Report) -> None:
        for pair, graph, output, case, entry in other.entries():
            self.add(pair, graph, output, case, entry)
        self.layers.update(other.layers)
        self.skipped.extend(other.skipped)
        self.errors.extend(other.errors)

    # ---------------------------------------------------------------- reading
    def __getitem__(self, pair: tuple[str, str]) -> dict[str, dict[str, dict[str, Entry]]]:
        return self.results[pair]

    def entries(self) -> Iterator[tuple[tuple[str, str], str, str, str, Entry]]:
        for pair, graphs in self.results.items():
            for graph, outputs in graphs.items():
                for output, cases in outputs.items():
                    for case, entry in cases.items():
                        yield pair, graph, output, case, entry

    @property
    def compared(self) -> int:
        return sum(1 for _ in self.entries())

    @property
    def failed(self) -> int:
        return sum(1 for *_, e in self.entries() if not e.passed)

    def __bool__(self) -> bool:
        """The verdict: something was compared, all of it passed, and no check raised."""
        return self.compared > 0 and self.failed == 0 and not self.errors

    @property
    def verdict(self) -> str:
        if self:
            return "pass"
        return "fail"

    def graph_passed(self, pair: tuple[str, str], graph: str) -> bool:
        return all(e.passed for cases in self.results.get(pair, {}).get(graph, {}).values() for e in cases.values())

    def failed_graphs(self) -> list[tuple[tuple[str, str], str]]:
        return [(pair, g) for pair, graphs in self.results.items() for g in graphs if not self.graph_passed(pair, g)]

    def failures(self) -> list[str]:
        """One line per failed output: pair | graph | output: how many cases failed, and the worst
        case with each failed gate and by how much; then the first diverging layer of each
        localised graph, then the checks that raised. (Every failed case is in to_dict().)"""
        lines = []
        if self.compared == 0:
            lines.append("nothing was compared: a report with zero compared outputs is a failure")
        for pair, graphs in self.results.items():
            for graph, outputs in graphs.items():
                if (pair, graph) in self.layers and self.layers[(pair, graph)].first is not None:
                    lr = self.layers[(pair, graph)]
                    lines.append(f"{pair_key(pair)} | {graph}: first diverging layer {lr.describe_first()}")
                for output, cases in outputs.items():
                    bad = [(case, e) for case, e in cases.items() if not e.passed]
                    if not bad:
                        continue
                    case, worst = max(bad, key=lambda ce: _severity(ce[1]))
                    head = f"{pair_key(pair)} | {graph} | {output}"
                    if len(cases) > 1:
                        head += f": {len(bad)}/{len(cases)} cases failed, worst {case}"
                    else:
                        head += f" | {case}"
                    lines.append(f"{head}: {'; '.join(worst.failed_gates())}")
        lines.extend(f"error: {m}" for m in self.errors)
        return lines

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        pairs: dict[str, Any] = {}
        for pair, graphs in self.results.items():
            pg = pairs.setdefault(pair_key(pair), {"reference": pair[0], "candidate": pair[1], "graphs": {}})
            for graph, outputs in graphs.items():
                go = pg["graphs"].setdefault(graph, {"passed": self.graph_passed(pair, graph), "outputs": {}})
                for output, cases in outputs.items():
                    go["outputs"][output] = {
                        "passed": all(e.passed for e in cases.values()),
                        "worst": _worst(cases.values()),
                        "cases": {case: e.to_dict() for case, e in cases.items()},
                    }
        return {
            "verdict": self.verdict,
            "passed": bool(self),
            "compared": self.compared,
            "failed": self.failed,
            "failures": self.failures(),
            "skipped": [s.to_dict() for s in self.skipped],
            "errors": list(self.errors),
            "meta": self.meta,
            "pairs": pairs,
            "layers": {f"{pair_key(p)} | {g}": lr.to_dict() for (p, g), lr in self.layers.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=_json_default)

    def to_markdown(self) -> str:
        return "\n".join(_markdown(self)) + "\n"

    def save(self, out_dir: str | Path, overwrite: bool = False) -> dict[str, Path]:
        """Write report.json, report.md and the error-per-layer plot into `out_dir`; an earlier
        report there is replaced only with `overwrite` (its plot too, if this report has none)."""
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise InputError(f"{out}: exists and is not a directory")
        held = earlier_report(out)
        if held and not overwrite:
            raise InputError(f"{out}: already holds {', '.join(held)}; pass overwrite=True to replace them")
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "report.json", "markdown": out / "report.md"}
        plot = plot_errors(self, out / PLOT_FILE)
        if plot is not None:
            paths["plot"] = plot
            self.meta["plot"] = plot.name
        else:  # a plot left from an earlier report would pass for this one's
            (out / PLOT_FILE).unlink(missing_ok=True)
        paths["json"].write_text(self.to_json())
        paths["markdown"].write_text(self.to_markdown())
        return paths


def earlier_report(out_dir: str | Path) -> list[str]:
    """The files of a report already in `out_dir`: what `Report.save` would replace."""
    return [name for name in REPORT_FILES if (Path(out_dir) / name).exists()]


def environment() -> dict[str, str]:
    """Versions of everything that changes numerics (recorded in every report)."""
    import numpy
    import onnx
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    env["onnx"] = onnx.__version__
    for mod in ("onnxruntime", "polygraphy", "transformers", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - an optional package that is absent or broken is just not listed
            continue
    env["machine"] = platform.machine()
    return env


# -------------------------------------------------------------------------------- internals
def _worst(entries: Any) -> dict[str, Any]:
    """Aggregate over cases: worst max/mean abs error, lowest cosine and top-1 agreement."""
    out: dict[str, Any] = {}
    for key, pick in (("max_abs", max), ("mean_abs", max), ("max_rel", max), ("cosine", min), ("top1", min)):
        vals = [getattr(e, key) for e in entries if isinstance(getattr(e, key, None), (int, float))]
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            out[key] = pick(vals)
    return out


def _severity(e: Any) -> float:
    """How badly an entry failed, to pick the worst case (tensors: max abs error)."""
    v = getattr(e, "max_abs", None)
    if isinstance(v, float):
        return v if math.isfinite(v) else math.inf
    return 0.0


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"report: cannot serialize {type(o).__name__}")


def _g(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.6f}" if 0.01 <= abs(v) <= 1.0 else f"{v:.3g}"
    return str(v)


def _markdown(r: Report) -> Iterator[str]:
    yield f"# fastblt validate: {r.verdict.upper()}"
    yield ""
    yield f"{r.compared} compared, {r.failed} failed, {len(r.skipped)} skipped, {len(r.errors)} errors."
    yield ""
    if r.meta:
        yield "| field | value |"
        yield "|---|---|"
        for k, v in r.meta.items():
            if k != "environment":
                yield f"| {k} | {_md_cell(v)} |"
        for k, v in r.meta.get("environment", {}).items():
            yield f"| {k} | {v} |"
        yield ""
    fails = r.failures()
    if fails:
        yield "## Failed gates"
        yield ""
        yield from (f"- {line}" for line in fails)
        yield ""
    if r.skipped:
        yield "## Skipped (not passed)"
        yield ""
        yield from (f"- {s.what}: {s.reason}" for s in r.skipped)
        yield ""
    for pair, graphs in r.results.items():
        yield f"## {pair_key(pair)}"
        yield ""
        yield "| graph | output | cases | max abs | mean abs | min cosine | min top-1 | gate | result |"
        yield "|---|---|---|---|---|---|---|---|---|"
        for graph, outputs in graphs.items():
            for output, cases in outputs.items():
                w = _worst(cases.values())
                ok = all(e.passed for e in cases.values())
                gate = _gate_text(next(iter(cases.values())))
                yield (
                    f"| {graph} | {output} | {len(cases)} | {_g(w.get('max_abs'))} | {_g(w.get('mean_abs'))} | "
                    f"{_g(w.get('cosine'))} | {_g(w.get('top1'))} | {gate} | {'pass' if ok else '**FAIL**'} |"
                )
        yield ""
        seq = [(g, o, c, e) for g, outs in graphs.items() for o, cs in outs.items() for c, e in cs.items()]
        seq = [(g, o, c, e) for g, o, c, e in seq if not hasattr(e, "max_abs")]
        if seq:
            yield "| check | case | result | detail |"
            yield "|---|---|---|---|"
            for g, _o, c, e in seq:
                yield f"| {g} | {c} | {'pass' if e.passed else '**FAIL**'} | {_md_cell(e.summary())} |"
            yield ""
    for (pair, graph), lr in r.layers.items():
        yield f"## Per layer: {pair_key(pair)} | {graph}"
        yield ""
        yield from lr.markdown_lines()
        yield ""
    if r.meta.get("plot"):
        yield f"![error per layer]({r.meta['plot']})"
        yield ""


def _gate_text(e: Any) -> str:
    tol = getattr(e, "tolerance", None)
    if tol is not None and hasattr(tol, "describe"):
        return tol.describe()
    return getattr(e, "gate", "identical bytes")


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def plot_errors(report: Report, path: Path) -> Path | None:
    """Error per layer: per pair and graph, the worst max-abs error of each layer's cache entries
    (present.{i}.*) and of the graph's other outputs; plus, for each localised graph, the error of
    every module in execution order. Returns None when there is nothing to plot."""
    series = _layer_series(report)
    localised = [(key, lr) for key, lr in report.layers.items() if lr.rows]
    if not series and not localised:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 1 + len(localised)
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.6 * n), squeeze=False)
    ax = axes[0][0]
    for label, xs, ys in series:
        ax.plot(xs, [max(y, 1e-12) for y in ys], marker="o", label=label)
    ax.set_yscale("log")
    if series:
        top = max(max(xs) for _, xs, _ in series)
        ax.set_xticks([OUTPUTS_X, *range(top + 1)])
        ax.set_xticklabels(["outputs", *map(str, range(top + 1))])
    gate = report.meta.get("atol")
    if gate:
        ax.axhline(gate, color="gray", linestyle=":", label=f"gate {gate:g}")
    ax.set_xlabel("layer (cache entries present.{i}.k/v); 'outputs': logits, h, latents, entropies")
    ax.set_ylabel("max |cand - ref|")
    ax.set_title("graph outputs: error per layer")
    if series:
        ax.legend(fontsize=7, ncol=2)
    for i, ((pair, graph), lr) in enumerate(localised, start=1):
        ax = axes[i][0]
        ys = [max(row.max_abs, 1e-12) if math.isfinite(row.max_abs) else 1e-12 for row in lr.rows]
        ax.plot(range(len(ys)), ys, marker=".")
        if lr.first is not None:
            j = next(k for k, row in enumerate(lr.rows) if row.module == lr.first.module)
            ax.axvline(j, color="red", linestyle="--", label=f"first diverging: {lr.first.module}")
            ax.legend(fontsize=7)
        ax.axhline(lr.atol, color="gray", linestyle=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(lr.rows)))
        ax.set_xticklabels([row.module for row in lr.rows], rotation=90, fontsize=5)
        ax.set_title(f"{pair_key(pair)} | {graph}: error per module (execution order)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


OUTPUTS_X = -1  # the series' point for the graph's other outputs (logits, h, latents, ...)


def _layer_series(report: Report) -> list[tuple[str, list[int], list[float]]]:
    """Per pair and graph: worst max-abs error per cache layer, and of the other outputs."""
    out = []
    for pair, graphs in report.results.items():
        for graph, outputs in graphs.items():
            per_layer: dict[int, float] = {}
            for output, cases in outputs.items():
                w = _worst(cases.values()).get("max_abs")
                if w is None:
                    continue
                parts = output.split(".")
                x = int(parts[1]) if len(parts) == 3 and parts[0] == "present" and parts[1].isdigit() else OUTPUTS_X
                per_layer[x] = max(per_layer.get(x, 0.0), w)
            if any(x != OUTPUTS_X for x in per_layer):
                xs = sorted(per_layer)
                out.append((f"{pair_key(pair)} | {graph}", xs, [per_layer[x] for x in xs]))
    return out
