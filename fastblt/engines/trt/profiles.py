"""TensorRT optimization profiles, derived from an export manifest (no TensorRT needed here).

A step graph serves several phases of generation, each with its own range of the dynamic dims
(`batch`, `new`, `patches`, `patch_len`, and `past`: the global cache's live slots, whose range is
the same in every phase, from one bucket to the global model's position limit; the rings of the
windowed stacks are static and stay as exported):

    phase     new (S positions)             patches (global step)   used by
    decode    1                             1                       ar, drafting one byte
    verify    1..k+1                        1..k+1                  blt-s / blt-dv verify pass
    block     1..B                          1..B                    blt-d block steps and commits
    prefill   1..prefill chunk              1..chunk                the prompt, chunk by chunk

Every phase becomes one optimization profile (`min/opt/max` per dynamic input, min 1 for every
dim: zero-length dims in profiles are fragile, deploy_notes.md §2.3, microsoft/onnxruntime-genai
PR #1659), and the backend runs a call on the smallest profile whose ranges contain it. Phases
whose ranges coincide (e.g. k+1 == B) are merged into one profile named "verify+block". The
diffusion head (`decoder_block`) only runs blocks. Wide ranges tune one tactic set for `opt`
(NVIDIA/TensorRT#1166), hence one profile per phase rather than one [1, max_step] profile.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fastblt.errors import InputError, ManifestMismatch
from fastblt.export.spec import DEFAULT_K, DEFAULT_MAX_STEP, DYNAMIC_DIMS, TensorSpec

PHASES = ("decode", "verify", "block", "prefill")
PHASES_OF_STEP = {"decoder_block": ("block",)}  # every other step: all PHASES
DEFAULT_PREFILL = DEFAULT_MAX_STEP  # DecodeOptions.prefill_chunk's default: the export's max_step
TYPICAL_PAST = 1024  # the `opt` of the global cache's slots: a few KB of context
# BLT's entropy patching averages about 4 bytes per patch; it sets the `opt` of the global step's
# patch dims (a chunk of S bytes closes about S/4 patches of about 4 bytes). Only tuning, not limits.
TYPICAL_PATCH_BYTES = 4
PROFILE_KEYS = ("prefill", "decode", "verify", "block", "patch_len")


@dataclass(frozen=True)
class DimRange:
    """min <= opt <= max, all >= 1 (TensorRT profile semantics for one named dim)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise InputError(f"profile range {self.min}/{self.opt}/{self.max}: expected 1 <= min <= opt <= max")

    def contains(self, n: int) -> bool:
        return self.min <= n <= self.max

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True)
class Profile:
    """One optimization profile of one step graph: a range per dynamic dim the graph uses."""

    name: str  # "decode" | "verify" | "block" | "prefill", or merged names "verify+block"
    dims: Mapping[str, DimRange] = field(hash=False)

    def contains(self, sizes: Mapping[str, int]) -> bool:
        return all(self.dims[d].contains(n) for d, n in sizes.items() if d in self.dims)

    def volume(self) -> int:
        """How many shapes the profile admits: the backend prefers the smallest containing one."""
        return math.prod(r.max - r.min + 1 for r in self.dims.values())

    def shapes(self, t: TensorSpec) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of one graph input: named dims from the profile, static dims as is."""
        return tuple(
            tuple(getattr(self.dims[d], which) if isinstance(d, str) else d for d in t.shape)
            for which in ("min", "opt", "max")
        )

    def to_dict(self) -> dict:
        return {"name": self.name, "dims": {d: r.to_list() for d, r in sorted(self.dims.items())}}

    @classmethod
    def from_dict(cls, d: Mapping) -> Profile:
        return cls(d["name"], {k: DimRange(*v) for k, v in d["dims"].items()})


@dataclass(frozen=True)
class PhaseSizes:
    """The largest `new` of each phase, the max batch and the patch-length cap (resolved, ints)."""

    prefill: int
    decode: int
    verify: int
    block: int | None  # None: the checkpoint has no diffusion head
    max_batch: int
    patch_len: int

    def to_dict(self) -> dict:
        return {
            "prefill": self.prefill,
            "decode": self.decode,
            "verify": self.verify,
            "block": self.block,
            "max_batch": self.max_batch,
            "patch_len": self.patch_len,
        }


def parse_profile_option(text: str | None) -> dict[str, int]:
    """`--profile prefill=256,decode=1,verify=9` -> {"prefill": 256, "decode": 1, "verify": 9}.

    Keys: prefill, decode, verify, block (the largest `new` of that phase) and patch_len (the
    longest patch the global step accepts). Every value is an int >= 1.
    """
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in PROFILE_KEYS:
            raise InputError(f"--profile {item!r}: expected KEY=INT with KEY one of {', '.join(PROFILE_KEYS)}")
        if key in out:
            raise InputError(f"--profile: {key} given twice")
        try:
            n = int(value)
        except ValueError:
            raise InputError(f"--profile {item!r}: {value!r} is not an int") from None
        if n < 1:
            raise InputError(f"--profile {item!r}: expected an int >= 1 (TensorRT profiles need min >= 1)")
        out[key] = n
    return out


def export_dims(manifest: Mapping) -> dict[str, tuple[int, int]]:
    """The manifest's named dims -> (min, max): the ranges the graphs were exported for."""
    dims = manifest.get("dims")
    if not isinstance(dims, Mapping) or any(d not in dims for d in DYNAMIC_DIMS):
        raise ManifestMismatch(f"manifest: field dims: expected {list(DYNAMIC_DIMS)}, got {dims!r}")
    return {d: (int(dims[d]["min"]), int(dims[d]["max"])) for d in DYNAMIC_DIMS}


def block_size(manifest: Mapping) -> int | None:
    """The diffusion block size B from the manifest's checkpoint config (None for plain BLT)."""
    blt_d = manifest["checkpoint"]["config"].get("blt_d")
    return int(blt_d["block_size"]) if blt_d else None


def resolve_sizes(
    requested: Mapping[str, int], ranges: Mapping[str, tuple[int, int]], block: int | None, max_batch: int = 1
) -> PhaseSizes:
    """Fill defaults and check every size against the export's ranges.

    Defaults are clamped to the export (prefill: its max_step); a value the user asked for
    that the export cannot take is an error, never silently lowered.
    """
    new_max, batch_max, len_max = ranges["new"][1], ranges["batch"][1], ranges["patch_len"][1]

    def pick(key: str, default: int, limit: int, what: str) -> int:
        if key not in requested:
            return min(default, limit)
        if requested[key] > limit:
            raise InputError(f"--profile {key}={requested[key]}: exceeds the export's {what} ({limit})")
        return requested[key]

    if "block" in requested and block is None:
        raise InputError("--profile block: this checkpoint has no diffusion head (no blt_d config)")
    if not 1 <= max_batch <= batch_max:
        raise InputError(f"--max-batch {max_batch}: the export admits batch 1..{batch_max}")
    return PhaseSizes(
        prefill=pick("prefill", DEFAULT_PREFILL, new_max, "max new positions (max_step)"),
        decode=pick("decode", 1, new_max, "max new positions"),
        verify=pick("verify", DEFAULT_K + 1, new_max, "max new positions"),
        block=None if block is None else pick("block", block, new_max, "max new positions"),
        max_batch=max_batch,
        patch_len=pick("patch_len", len_max, len_max, "max patch length"),
    )


def phase_dims(phase: str, sizes: PhaseSizes, ranges: Mapping[str, tuple[int, int]]) -> dict[str, DimRange]:
    """The named dims of one phase (a step keeps those its inputs use)."""
    n = {"decode": sizes.decode, "verify": sizes.verify, "block": sizes.block, "prefill": sizes.prefill}[phase]
    patches = min(n, ranges["patches"][1])  # S new bytes close at most S patches
    opt_patches = 1 if phase == "decode" else min(patches, max(1, math.ceil(n / TYPICAL_PATCH_BYTES)))
    return {
        "batch": DimRange(1, 1, sizes.max_batch),  # the runtime runs one sequence per call
        "new": DimRange(1, n, n),
        "patches": DimRange(1, opt_patches, patches),
        "patch_len": DimRange(1, min(sizes.patch_len, 2 * TYPICAL_PATCH_BYTES), sizes.patch_len),
        "past": DimRange(1, min(TYPICAL_PAST, ranges["past"][1]), ranges["past"][1]),
    }


def step_profiles(
    step: str, inputs: Sequence[TensorSpec], sizes: PhaseSizes, ranges: Mapping[str, tuple[int, int]]
) -> list[Profile]:
    """The profiles of one step graph, smallest first, identical ranges merged."""
    used = sorted({d for t in inputs for d in t.shape if isinstance(d, str)})
    unknown = [d for d in used if d not in DYNAMIC_DIMS]
    if unknown:
        raise ManifestMismatch(f"graph {step}: unknown dynamic dim(s) {unknown}; expected {list(DYNAMIC_DIMS)}")
    merged: dict[tuple, list[str]] = {}
    for phase in PHASES_OF_STEP.get(step, PHASES):
        if phase == "block" and sizes.block is None:
            continue
        dims = phase_dims(phase, sizes, ranges)
        key = tuple((d, dims[d]) for d in used)
        merged.setdefault(key, []).append(phase)
    profiles = [Profile("+".join(names), dict(key)) for key, names in merged.items()]
    if not profiles:
        raise ManifestMismatch(f"graph {step}: no phase runs it (a diffusion head without a block size?)")
    return sorted(profiles, key=Profile.volume)


def graph_inputs(manifest: Mapping, step: str) -> list[TensorSpec]:
    """A graph's inputs as recorded in the manifest (name, dtype, shape with named dims)."""
    try:
        return [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["graphs"][step]["inputs"]]
    except (KeyError, TypeError) as e:
        raise ManifestMismatch(f"manifest: field graphs.{step}.inputs: unreadable ({e!r})") from None


def manifest_profiles(
    manifest: Mapping, requested: Mapping[str, int] | None = None, max_batch: int = 1
) -> dict[str, list[Profile]]:
    """Every graph of an export -> its profiles. `requested`: parsed `--profile` values."""
    ranges = export_dims(manifest)
    sizes = resolve_sizes(requested or {}, ranges, block_size(manifest), max_batch)
    return {step: step_profiles(step, graph_inputs(manifest, step), sizes, ranges) for step in manifest["graphs"]}


def named_sizes(step: str, inputs: Iterable[TensorSpec], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """The value of each named dim in one call, read from the feeds' shapes (consistent or an error)."""
    sizes: dict[str, int] = {}
    for t in inputs:
        shape = shapes[t.name]
        for d, n in zip(t.shape, shape, strict=True):
            if not isinstance(d, str):
                continue
            if sizes.setdefault(d, int(n)) != n:
                raise InputError(
                    f"step {step} | input {t.name}: dim {d} is {n}, but another input has {d} = {sizes[d]}"
                )
    return sizes


def select_profile(step: str, profiles: Sequence[Profile], sizes: Mapping[str, int]) -> int:
    """Index of the smallest profile containing `sizes` (InputError naming both when none does)."""
    best = None
    for i, p in enumerate(profiles):
        if p.contains(sizes) and (best is None or p.volume() < profiles[best].volume()):
            best = i
    if best is None:
        have = "; ".join(f"{p.name} {p.to_dict()['dims']}" for p in profiles)
        raise InputError(
            f"step {step}: sizes {dict(sizes)} fit none of the engine's profiles ({have}); "
            "rebuild with a larger --profile (fastblt build --profile prefill=..,verify=..)"
        )
    return best
