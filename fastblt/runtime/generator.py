"""The public generation API: `Generator(checkpoint_or_model, backend=...)` -> `.generate` / `.stream`.

    g = fastblt.Generator("default", backend="ort")
    out = g.generate("def main(", mode="blt-s", max_bytes=128)
    out.text, out.bytes, out.stats.bytes_per_s
    for chunk in g.stream("def main(", mode="blt-d"): print(chunk, end="")

Threads: a Generator may be shared by several threads. Every call gets its own SequenceState
(host state and caches, taken from a small pool so big buffers are not reallocated per call),
and the backend is shared behind its step locks: each step graph call plus the copy of its
outputs holds its step's lock (backends own their output buffers), so calls interleave step by
step and never see each other's data, one sequence per step call. For throughput across many
requests, batch them (batch.py, async_engine.py). Host time in the statistics includes time
spent waiting for the locks.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastblt.engines.base import Backend
from fastblt.engines.registry import check_name
from fastblt.errors import InputError
from fastblt.export.cache import ExportNotice
from fastblt.model.blt import BltModel
from fastblt.model.config import BltConfig
from fastblt.runtime import courtesy, loops
from fastblt.runtime.calls import run_plan
from fastblt.runtime.engine import Engine, open_engine
from fastblt.runtime.options import DecodeOptions, Request, check_fit, checked, make_request
from fastblt.runtime.prompt_cache import DEFAULT_MB, check_budget
from fastblt.runtime.sampling import new_rng
from fastblt.runtime.state import SequenceState
from fastblt.runtime.stats import BYTES_PER_PARAM, RoundStats, Stats, build_stats
from fastblt.runtime.stream import Output, TextChunker


@dataclass
class Generation:
    """The result of one call. `bytes`: the output (without EOS or the stop string); `text`: it
    decoded as UTF-8 (invalid sequences replaced by U+FFFD); `ids`: every generated id (EOS
    excluded, stop-string bytes included)."""

    text: str
    bytes: bytes
    ids: list[int]
    stop_reason: str  # "eos" | "stop" | "max_bytes"
    stats: Stats
    times: list[float] = field(default_factory=list)  # time.perf_counter() when each id was verified
    # option logprobs: per id, its log-probability under the model (natural log), and the
    # `logprobs` most likely ids with theirs (most likely first); None when not asked for
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    # option prompt_logprobs: the same for every prompt id after BOS (the first given BOS alone)
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None


class Generator:
    """Generates bytes from a BLT / BLT-D checkpoint with one of four decoding modes.

    Args:
        checkpoint_or_model: "default" (the embedded checkpoint), a checkpoint directory (any
            format fastblt.formats.checkpoint reads) or a BltModel.
        backend: "ort" (default), "torch" or "trt"; or an Engine or a Backend instance already set
            up for this model (the other backend options do not apply).
        artifacts: a directory with exported step graphs and their manifest (ort / trt); None
            exports on first use into a cache directory keyed by the checkpoint's hash.
        max_context: the most ids (BOS + prompt + output) one call may hold; None: no limit in
            bytes. Either way a sequence ends at the global model's position limit (in patches:
            4096 for the default, about 16 KB of code), with an error naming it. Caches grow with
            the context, so this bounds a call's memory, not the speed of short ones.
        threads: intra-op threads of the backend (None: the backend's default).
        cache_dir: where first-use exports go (default ~/.cache/fastblt).
        device: where the torch or trt backend computes and the caches live ("cpu", "cuda",
            "cuda:1"); None: the torch backend's model's device, trt's "cuda". The ort backend
            computes where its execution providers run.
        cuda_graphs: torch backend on CUDA: replay repeated small step calls as CUDA graphs
            (None: on for CUDA devices; False: every call eager).
        on_export: told once, with the cache directory, before a first-use export starts (it takes
            seconds); may return a per-graph progress callback (export/exporter.py `Progress`).
        prompt_cache_mb: memory for prompt snapshots (None: 64 MB; 0: none): a call whose prompt
            begins with one committed before (the same prompt, a conversation's next turn) loads
            it instead of committing it again, with the same bytes (runtime/prompt_cache.py;
            docs/generation.md).
    """

    def __init__(
        self,
        checkpoint_or_model: str | Path | BltModel = "default",
        backend: str | Backend = "ort",
        artifacts: str | Path | None = None,
        max_context: int | None = None,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        cuda_graphs: bool | None = None,
        on_export: ExportNotice | None = None,
        prompt_cache_mb: float | None = None,
    ):
        if not isinstance(backend, (Engine, Backend)):
            check_name(backend)
        if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
            raise InputError(f"max_context: expected an int >= 2, got {max_context!r}")
        _check_loading(threads, cache_dir, on_export)
        prompt_mb = DEFAULT_MB if prompt_cache_mb is None else check_budget(prompt_cache_mb)
        self.model, self.checkpoint_path = _load(checkpoint_or_model)
        self.config: BltConfig = self.model.config
        if self.config.entropy is None:
            raise InputError("checkpoint: has no entropy model; the runtime patches with it")
        self.params = self.model.num_params()
        self.max_context = max_context
        if isinstance(backend, (Engine, Backend)):
            given = dict(artifacts=artifacts, threads=threads, device=device)
            given |= dict(cache_dir=cache_dir, cuda_graphs=cuda_graphs, on_export=on_export)
            if isinstance(backend, Engine):  # an Engine keeps its own prompt snapshots
                given["prompt_cache_mb"] = prompt_cache_mb
            extra = [k for k, v in given.items() if v is not None]
            if extra:
                kind = "an Engine" if isinstance(backend, Engine) else "a Backend"
                raise InputError(f"{', '.join(extra)}: not used with {kind} instance (it is already set up)")
            self.engine = backend if isinstance(backend, Engine) else Engine(backend, self.config, prompt_mb)
            if self.engine.config != self.config:
                raise InputError("backend: the Engine runs another checkpoint's config")
            self.backend_name = self.engine.backend.name
            return
        self.backend_name = backend
        self.engine = open_engine(
            self.model, backend, self.checkpoint_path, artifacts, threads, cache_dir, device, cuda_graphs,
            on_export, prompt_mb,
        )  # fmt: skip

    # ------------------------------------------------------------------ public API
    @property
    def device(self) -> torch.device:
        """Where the backend computes and this Generator's caches live."""
        return self.engine.backend.device

    def generate(
        self, prompt: str | bytes | Request, mode: str = "blt-d", max_bytes: int = 256, **options: Any
    ) -> Generation:
        """Generate up to `max_bytes` ids after `prompt` (str: UTF-8; bytes: as is).

        options: see DecodeOptions (temperature, top_k, top_p, seed, k, lookup, unmask, alpha, gamma,
        block_start, stop, stop_on_eos, prefill_chunk). Bad values raise before any work.
        `prompt` may instead be a Request (options.make_request: checked once, e.g. on admission),
        given alone.
        """
        call = self._call(prompt, mode, max_bytes, options)
        for _ in call:
            pass
        return call.result

    def stream(
        self, prompt: str | bytes | Request, mode: str = "blt-d", max_bytes: int = 256, **options: Any
    ) -> Iterator[str]:
        """Like `generate`, yielding text chunks as they are verified (never a split UTF-8
        sequence, never a byte that may still become part of a stop string). The finished
        Generation is the iterator's return value (`StopIteration.value`)."""
        call = self._call(prompt, mode, max_bytes, options)  # checks run now, not on first next()
        return self._stream(call)

    def _stream(self, call: _Call) -> Iterator[str]:
        chunker = TextChunker(call.opts.stop)
        for _ in call:
            text = chunker.take(call.out.data)
            if text:
                yield text
        text = chunker.take(call.out.data, final=True)
        if text:
            yield text
        return call.result

    def close(self) -> None:
        """Release the backend's sessions (after the step calls in flight; a later call loads them again)."""
        self.engine.close()

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ a call
    def request(self, prompt: str | bytes, mode: str = "blt-d", max_bytes: int = 256, **options: Any) -> Request:
        """The checked Request `generate` would run (see options.make_request)."""
        return make_request(prompt, self.config, mode, max_bytes, **options)

    def _call(self, prompt: str | bytes | Request, mode: str, max_bytes: int, options: dict[str, Any]) -> _Call:
        if isinstance(prompt, Request):
            if options or (mode, max_bytes) != ("blt-d", 256):
                raise InputError("generate: a Request carries its own mode, max_bytes and options; give it alone")
            req = checked(prompt, self.config)
        else:
            req = self.request(prompt, mode, max_bytes, **options)
        check_fit(req, self.engine.max_step, self.max_context)
        return _Call(self, list(req.ids), req.opts)


class _Call:
    """One generation: iterate it to run the rounds; `.result` once it is exhausted."""

    def __init__(self, gen: Generator, ids: list[int], opts: DecodeOptions):
        self.g, self.ids, self.opts = gen, ids, opts
        self.out = Output(opts.max_bytes, opts.stop, opts.stop_on_eos, opts.logprobs, opts.prompt_logprobs)
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[None]:
        g = self.g
        state = g.engine.acquire()
        caller = threading.get_ident()
        courtesy.busy(caller)  # schemas compiling on other threads hand this call the GIL
        try:
            run = new_run(state, self.opts, self.out)
            chunk = self.opts.prefill_chunk or state.max_step
            yield from run_plan(state.runner, loops.generate(run, self.ids, chunk, g.engine.prompts))
            self.result = generation(run, g.backend_name, len(self.ids), g.params, g.config)
        finally:
            courtesy.idle(caller)
            g.engine.release(state)


def new_run(state: SequenceState, opts: DecodeOptions, out: Output) -> loops.Run:
    """A call's context on `state`: its options, where its bytes go, its own seeded RNG."""
    rng = None if opts.sampling.greedy else new_rng(opts.seed)
    return loops.Run(state, opts, out, rng, RoundStats())


def generation(run: loops.Run, backend: str, prompt_ids: int, params: dict[str, int], config: BltConfig) -> Generation:
    """The Generation of a finished run (loops.generate ran to its end): decode counters are the
    call's minus its prefill's."""
    st, pre = run.state, run.prefill
    stats = build_stats(
        mode=run.opts.mode,
        backend=backend,
        prompt_ids=prompt_ids,
        out_ids=len(run.out.ids),
        stop_reason=run.out.stop_reason or "max_bytes",
        calls={s: st.calls[s] - pre["calls"][s] for s in st.calls},
        positions={s: st.positions[s] - pre["positions"][s] for s in st.positions},
        prefill_calls=pre["calls"],
        rounds=run.rounds,
        params=params,
        hash_row_bytes=config.n_hash_tables * config.d_local * BYTES_PER_PARAM,
        times=run.out.times,
        t_start=pre["t_start"],
        t_prefill=pre["t_end"],
        t_end=time.perf_counter(),
        backend_s=st.backend_seconds,
        prefill_backend_s=pre["backend_s"],
        prompt_cached=pre.get("cached", 0),
    )
    data = bytes(run.out.data)
    text = data.decode("utf-8", errors="replace")
    ids, times, out = list(run.out.ids), list(run.out.times), run.out
    return Generation(text=text, bytes=data, ids=ids, stop_reason=stats.stop_reason, stats=stats, times=times,
                      logprobs=out.logprobs, top_logprobs=out.top_logprobs, prompt_logprobs=out.prompt_logprobs,
                      prompt_top_logprobs=out.prompt_top_logprobs)  # fmt: skip


# ---------------------------------------------------------------------- construction helpers
def _load(checkpoint_or_model: str | Path | BltModel) -> tuple[BltModel, Path | None]:
    if isinstance(checkpoint_or_model, BltModel):
        return checkpoint_or_model.eval(), None
    if not isinstance(checkpoint_or_model, (str, Path)):
        raise InputError(
            f"checkpoint_or_model: expected 'default', a checkpoint directory or a BltModel, "
            f"got {type(checkpoint_or_model).__name__}"
        )
    from fastblt.formats.checkpoint import load_checkpoint, resolve_checkpoint_path

    path = resolve_checkpoint_path(checkpoint_or_model)
    return load_checkpoint(path), path


MAX_THREADS = 256  # intra-op threads a backend may be given (a typo of 10**6 would try to start them all)


def _check_loading(threads: object, cache_dir: object, on_export: object) -> None:
    """InputError naming the loading argument that cannot work, before anything is loaded."""
    bad_int = isinstance(threads, bool) or not isinstance(threads, int)
    if threads is not None and (bad_int or not 1 <= threads <= MAX_THREADS):
        raise InputError(f"threads: expected an int in [1, {MAX_THREADS}], got {threads!r}")
    if cache_dir is not None:
        if not isinstance(cache_dir, (str, os.PathLike)):
            raise InputError(f"cache_dir: expected a directory path, got {cache_dir!r}")
        path = Path(cache_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise InputError(f"cache_dir {path}: exists and is not a directory")
    if on_export is not None and not callable(on_export):
        raise InputError(f"on_export: expected a callable or None, got {on_export!r}")
