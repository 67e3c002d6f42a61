"""Compare two arrays: error statistics, the gates of docs/validation.md, and the NaN/Inf check.

Gates (docs/validation.md):
- fp32 graphs vs torch: max abs error <= 1e-4. Where that fails and an fp64 (exact-arithmetic)
  output of the same step is given, the candidate is judged against fp64 instead: within 1e-4 +
  FP64_FACTOR x the torch fp32 reference's own error. An output of magnitude ~500 has an fp32
  spacing of 6e-5, so two correct fp32 implementations differ by more than 1e-4 (measured: the
  embedded default's global latents, where torch fp32 itself is up to 4.9e-4 from fp64).
- reduced precision (fp16/bf16): a composite gate, no single metric alone: cosine >= 0.99 and,
  for logits, top-1 agreement >= 0.99 over the rows where the reference's top-1/top-2 margin is
  >= 0.1 (rows closer than that are ties a rounding may flip; they are counted, not gated).
The NaN/Inf check is a separate step (`check_finite`), run on every candidate output before it is
compared; the statistics themselves are computed over finite elements only.

Tolerances are set per output name with an explicit default (key ""), as polygraphy's
`CompareFunc.simple` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

FP32_ATOL = 1e-4
FP64_FACTOR = 4.0  # a correct fp32 candidate's error vs fp64 measured <= 3.4x the torch reference's
FP64_WORDS = f"max |cand - fp64| <= atol + {FP64_FACTOR:g} x max |torch fp32 - fp64|"
COSINE_MIN = 0.99
TOP1_MIN = 0.99
TOP1_MARGIN = 0.1
REL_FLOOR = 1e-6  # |ref| below this counts as this in relative errors (reported, not gated)
REDUCED_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Tolerance:
    """The gate applied to one output. A None field is not gated (the statistic is still reported).

    atol: max |cand - ref| allowed. cosine: min cosine similarity (flattened, fp64).
    top1: min top-1 agreement over the last axis, counted on rows whose reference margin
    (top-1 minus top-2 value) is >= margin.
    """

    atol: float | None = FP32_ATOL
    cosine: float | None = None
    top1: float | None = None
    margin: float = TOP1_MARGIN

    def describe(self) -> str:
        parts = []
        if self.atol is not None:
            parts.append(f"max_abs <= {self.atol:g}")
        if self.cosine is not None:
            parts.append(f"cosine >= {self.cosine:g}")
        if self.top1 is not None:
            parts.append(f"top1 >= {self.top1:g} (margin >= {self.margin:g})")
        return " and ".join(parts) or "not gated"

    def to_dict(self) -> dict[str, Any]:
        return {"atol": self.atol, "cosine": self.cosine, "top1": self.top1, "margin": self.margin}


FP32 = Tolerance(atol=FP32_ATOL)
REDUCED = Tolerance(atol=None, cosine=COSINE_MIN)
REDUCED_LOGITS = Tolerance(atol=None, cosine=COSINE_MIN, top1=TOP1_MIN, margin=TOP1_MARGIN)
LOGIT_NAMES = ("logits",)


@dataclass(frozen=True)
class Tolerances:
    """Per-output tolerances; `by_name[""]` is the explicit default."""

    by_name: dict[str, Tolerance] = field(default_factory=lambda: {"": FP32})

    def __post_init__(self) -> None:
        if "" not in self.by_name:
            raise ValueError('Tolerances: the default (key "") is required')

    def get(self, name: str) -> Tolerance:
        return self.by_name.get(name, self.by_name[""])

    @classmethod
    def for_dtype(cls, dtype: str, atol: float | None = None) -> Tolerances:
        """The gates (docs/validation.md) for graphs in `dtype`; `atol` overrides the fp32 max-abs bound."""
        if dtype in REDUCED_DTYPES:
            return cls({"": REDUCED, **dict.fromkeys(LOGIT_NAMES, REDUCED_LOGITS)})
        if dtype != "float32":
            raise ValueError(f"dtype {dtype!r}: expected float32, float16 or bfloat16")
        return cls({"": Tolerance(atol=FP32_ATOL if atol is None else atol)})


@dataclass(frozen=True)
class Gate:
    """One checked statistic: `value op limit`, e.g. max_abs 3e-2 <= 1e-4 (failed)."""

    name: str
    value: float
    op: str  # "<=" or ">="
    limit: float
    passed: bool

    def describe(self) -> str:
        bad = {"<=": ">", ">=": "<"}[self.op]
        return f"{self.name} {_fmt(self.value)} {self.op if self.passed else bad} {_fmt(self.limit)}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": _num(self.value), "op": self.op, "limit": self.limit, "passed": self.passed}


@dataclass(frozen=True)
class FiniteResult:
    """The NaN/Inf check of one candidate output."""

    nan: int
    inf: int

    @property
    def passed(self) -> bool:
        return self.nan == 0 and self.inf == 0

    def __bool__(self) -> bool:
        return self.passed

    def describe(self) -> str:
        return "finite" if self.passed else f"{self.nan} NaN and {self.inf} Inf values"


@dataclass
class OutputResult:
    """Parity of one output: statistics, the tolerance applied, each gate and the verdict.

    Truthy only if the output passed (finite, same shape, every gate of its tolerance).
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    cosine: float
    top1: float | None  # None: not a logits-like output, or no row reached the margin
    top1_rows: int  # rows whose reference margin >= tolerance.margin
    rows: int
    worst_index: tuple[int, ...] | None
    ref_absmax: float
    tolerance: Tolerance
    finite: FiniteResult
    gates: list[Gate]
    error: str | None = None  # a structural failure (shape or dtype); no statistics then

    @property
    def passed(self) -> bool:
        return self.error is None and self.finite.passed and all(g.passed for g in self.gates)

    def __bool__(self) -> bool:
        return self.passed

    def failed_gates(self) -> list[str]:
        """Human lines naming each failed gate and by how much."""
        if self.error is not None:
            return [self.error]
        out = [] if self.finite.passed else [f"non-finite output: {self.finite.describe()}"]
        return out + [g.describe() for g in self.gates if not g.passed]

    def summary(self) -> str:
        if self.error is not None:
            return self.error
        head = f"max_abs {_fmt(self.max_abs)} mean_abs {_fmt(self.mean_abs)} cos {self.cosine:.6f}"
        if self.top1 is not None:
            head += f" top1 {self.top1:.4f} ({self.top1_rows}/{self.rows} rows)"
        return head

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "passed": self.passed,
            "max_abs": _num(self.max_abs),
            "mean_abs": _num(self.mean_abs),
            "max_rel": _num(self.max_rel),
            "mean_rel": _num(self.mean_rel),
            "cosine": _num(self.cosine),
            "top1": _num(self.top1),
            "top1_rows": self.top1_rows,
            "rows": self.rows,
            "worst_index": None if self.worst_index is None else list(self.worst_index),
            "ref_absmax": _num(self.ref_absmax),
            "tolerance": self.tolerance.to_dict(),
            "nan": self.finite.nan,
            "inf": self.finite.inf,
            "gates": [g.to_dict() for g in self.gates],
            "failed": self.failed_gates(),
            "error": self.error,
        }


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any dtype, bf16 included) or array-like -> numpy; floats widen to fp64."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        return x.numpy()
    a = np.asarray(x)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def check_finite(x: Any) -> FiniteResult:
    """The separate NaN/Inf step: counts of NaN and Inf in `x` (integers are always finite)."""
    a = to_numpy(x)
    if not np.issubdtype(a.dtype, np.floating):
        return FiniteResult(0, 0)
    return FiniteResult(int(np.isnan(a).sum()), int(np.isinf(a).sum()))


def top1_agreement(ref: np.ndarray, cand: np.ndarray, margin: float) -> tuple[float | None, int, int]:
    """Top-1 agreement over the last axis on rows whose reference margin >= `margin`.

    Returns (agreement or None when no row qualifies, qualifying rows, all rows).
    """
    V = ref.shape[-1]
    r, c = ref.reshape(-1, V), cand.reshape(-1, V)
    if V < 2 or r.shape[0] == 0:
        return None, 0, r.shape[0]
    top2 = np.sort(r, axis=-1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) >= margin
    n = int(keep.sum())
    if n == 0:
        return None, 0, r.shape[0]
    agree = r[keep].argmax(-1) == c[keep].argmax(-1)
    return float(agree.mean()), n, r.shape[0]


def compare(
    name: str,
    ref: Any,
    cand: Any,
    tolerance: Tolerance,
    logits_like: bool | None = None,
    exact: Any | None = None,
) -> OutputResult:
    """Compare candidate `cand` with reference `ref` (torch tensors or arrays, any float dtype).

    Statistics are computed in fp64 over the elements finite in both. `logits_like` (default: the
    name is "logits") decides whether top-1 agreement is computed at all. `exact`: the same output
    computed in fp64, consulted only when the max-abs gate fails (see `fp64_gate`).
    """
    r, c = to_numpy(ref), to_numpy(cand)
    finite = check_finite(c)
    if r.shape != c.shape:
        return _structural(name, r.shape, tolerance, finite, f"shape {c.shape}, expected {r.shape}")
    if r.size == 0:
        return _structural(name, r.shape, tolerance, finite, "empty output: nothing to compare")
    r = r.astype(np.float64)
    c = c.astype(np.float64)
    ok = np.isfinite(r) & np.isfinite(c)
    diff = np.where(ok, np.abs(c - r), 0.0)
    rel = diff / np.maximum(np.abs(r), REL_FLOOR)
    n_ok = max(int(ok.sum()), 1)
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape))
    rz, cz = np.where(ok, r, 0.0).ravel(), np.where(ok, c, 0.0).ravel()
    nr, nc = float(np.linalg.norm(rz)), float(np.linalg.norm(cz))
    cosine = 1.0 if nr == 0 and nc == 0 else (float(rz @ cz) / (nr * nc) if nr > 0 and nc > 0 else 0.0)
    logits_like = name in LOGIT_NAMES if logits_like is None else logits_like
    top1, top1_rows, rows = (None, 0, 0)
    if logits_like and r.ndim >= 1:
        top1, top1_rows, rows = top1_agreement(r, c, tolerance.margin)
    max_abs = float(diff.max())
    gates = []
    if tolerance.atol is not None:
        gate = Gate("max_abs", max_abs, "<=", tolerance.atol, max_abs <= tolerance.atol)
        gates.append(gate if gate.passed or exact is None else fp64_gate(r, c, exact, tolerance.atol))
    if tolerance.cosine is not None:
        gates.append(Gate("cosine", cosine, ">=", tolerance.cosine, cosine >= tolerance.cosine))
    if tolerance.top1 is not None and top1 is not None:
        gates.append(Gate("top1", top1, ">=", tolerance.top1, top1 >= tolerance.top1))
    return OutputResult(
        name=name,
        shape=tuple(r.shape),
        max_abs=max_abs,
        mean_abs=float(diff.sum() / n_ok),
        max_rel=float(rel.max()),
        mean_rel=float(rel.sum() / n_ok),
        cosine=cosine,
        top1=top1,
        top1_rows=top1_rows,
        rows=rows,
        worst_index=worst,
        ref_absmax=float(np.abs(np.where(ok, r, 0.0)).max()),
        tolerance=tolerance,
        finite=finite,
        gates=gates,
    )


def fp64_gate(ref: np.ndarray, cand: np.ndarray, exact: Any, atol: float) -> Gate:
    """The max-abs gate against exact arithmetic: the candidate may be as far from fp64 as `atol`
    plus FP64_FACTOR x the torch fp32 reference's own rounding error, no further. Where fp32
    resolves the output well the reference's error is tiny and the limit stays near `atol`.
    """
    x = to_numpy(exact).astype(np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"fp64 output: shape {x.shape}, expected {ref.shape}")
    ok = np.isfinite(ref) & np.isfinite(cand) & np.isfinite(x)
    ref_err = float(np.where(ok, np.abs(ref - x), 0.0).max())
    cand_err = float(np.where(ok, np.abs(cand - x), 0.0).max())
    limit = atol + FP64_FACTOR * ref_err
    return Gate("max_abs_vs_fp64", cand_err, "<=", limit, cand_err <= limit)


def _structural(name: str, shape: tuple, tolerance: Tolerance, finite: FiniteResult, why: str) -> OutputResult:
    nan = float("nan")
    return OutputResult(
        name, tuple(shape), nan, nan, nan, nan, nan, None, 0, 0, None, nan, tolerance, finite, [], f"{name}: {why}"
    )


def logits_margin(logits: Any) -> tuple[int, int, float]:
    """Top-1 id, top-2 id and their margin (top-1 minus top-2 value) of a (V,) logits row."""
    a = to_numpy(logits).reshape(-1)
    order = np.argsort(a)
    return int(order[-1]), int(order[-2]), float(a[order[-1]] - a[order[-2]])


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _num(v: float | None) -> float | None:
    """JSON-safe: NaN/Inf become None (JSON has neither)."""
    if v is None or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class SequenceResult:
    """Greedy output of a candidate vs the reference, byte for byte.

    Truthy only if at least one id was compared and the two id lists are identical. At the first
    differing id, `margin` is the reference's logits margin there (top-1 minus top-2: a margin
    near 0 is a numerical tie, a large one a real bug) and `step` names the first step graph
    call whose outputs part (index, step/module, position, output, error) when it is known.
    """

    ref_ids: list[int]
    cand_ids: list[int]
    first_diff: int | None = None
    margin: float | None = None
    ref_choice: int | None = None
    cand_choice: int | None = None
    step: dict[str, Any] | None = None
    note: str = ""
    tie_margin: float | None = None  # reduced precision: a divergence where margin < this is a tie
    gate: str = "identical bytes"

    @classmethod
    def of(cls, ref_ids: list[int], cand_ids: list[int]) -> SequenceResult:
        n = min(len(ref_ids), len(cand_ids))
        first = next((i for i in range(n) if ref_ids[i] != cand_ids[i]), None)
        if first is None and len(ref_ids) != len(cand_ids):
            first = n
        return cls(list(ref_ids), list(cand_ids), first)

    @property
    def compared(self) -> int:
        return min(len(self.ref_ids), len(self.cand_ids))

    @property
    def at_tie(self) -> bool:
        """Diverged where the reference could not decide (reduced precision only)."""
        return (
            self.first_diff is not None
            and self.tie_margin is not None
            and self.margin is not None
            and self.margin < self.tie_margin
        )

    @property
    def passed(self) -> bool:
        return self.compared > 0 and (self.first_diff is None or self.at_tie)

    def __bool__(self) -> bool:
        return self.passed

    def failed_gates(self) -> list[str]:
        if self.passed:
            return []
        if self.compared == 0:
            return ["nothing generated: zero bytes compared"]
        out = f"bytes differ from id {self.first_diff} of {max(len(self.ref_ids), len(self.cand_ids))}"
        if self.ref_choice is not None:
            out += f" (reference {self.ref_choice}, candidate {self.cand_choice})"
        if self.margin is not None:
            out += f"; reference logits margin there {self.margin:.4g}"
        if self.step:
            s = self.step
            what = f"{s['output']}: {s.get('detail')}" if s.get("output") else s.get("detail")
            mod = f" ({s['module']})" if s.get("module") else ""
            out += f"; first diverging step #{s.get('index')}: {s.get('step')}{mod}"
            out += f" at position {s.get('start')} ({what})"
        if self.note:
            out += f"; {self.note}"
        return [out]

    def summary(self) -> str:
        if self.passed and self.first_diff is None:
            return f"{self.compared} ids identical"
        if self.passed:
            return (
                f"identical for {self.first_diff} ids, then parted at a near-tie of the reference "
                f"(margin {self.margin:.3g} < {self.tie_margin:g}): accepted for reduced precision"
            )
        return self.failed_gates()[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "compared": self.compared,
            "ref_ids": self.ref_ids,
            "cand_ids": self.cand_ids,
            "first_diff": self.first_diff,
            "margin": _num(self.margin),
            "tie_margin": self.tie_margin,
            "at_tie": self.at_tie,
            "ref_choice": self.ref_choice,
            "cand_choice": self.cand_choice,
            "first_diverging_step": self.step,
            "note": self.note,
            "failed": self.failed_gates(),
        }
