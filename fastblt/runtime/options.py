"""Decoding options: one frozen dataclass, checked once per call before any work is done.

Per-mode defaults are resolved here (`resolve`), so the loops read plain values:
- blt-d: unmask "confidence" with alpha 0.7 (the paper's headline), or "entropy" with gamma 1.0.
- blt-dv: drafting "one-step" (every [MASK] filled by one diffusion pass: the paper's fastest
  setting, and the one whose draft distribution is exact for speculative sampling), or
  "confidence" with alpha 0.3 / "entropy" with gamma 1.5 (the paper's permissive settings).
- blt-s: k = 16 draft bytes (DEFAULT_K, or max_step - 1 on graphs that take fewer).
- blt-s and blt-dv, greedy: a round drafts from the context instead when its last 8 bytes
  occurred before (runtime/lookup.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from fastblt.errors import CapabilityError, InputError
from fastblt.export.spec import DEFAULT_K
from fastblt.model.config import VOCAB_SIZE, BltConfig
from fastblt.model.tokenizer import encode
from fastblt.runtime.grammar import CALLS, FORMATS, GRAMMAR, REGEX, compiled, derived, matching, tagged
from fastblt.runtime.lookup import LOOKUP_MATCH
from fastblt.runtime.sampling import SamplingParams

MODES = ("ar", "blt-d", "blt-s", "blt-dv")
UNMASK_RULES = {"blt-d": ("confidence", "entropy"), "blt-dv": ("one-step", "confidence", "entropy")}
BLOCK_START_RULES = ("force", "patch")
MAX_DRAFT = 64
LOOKUP_MODES = ("blt-s", "blt-dv")  # the verified modes: a draft from the context is checked like theirs
MAX_LOOKUP = 1024  # a longer suffix than this is as good as no lookup
MAX_LOGPROBS = 20  # most likely ids reported per byte (OpenAI's completions allow 5)
CAUSAL_MODES = ("ar", "blt-s", "blt-dv")  # every byte is drawn from the causal model's logits


@dataclass(frozen=True)
class DecodeOptions:
    """Everything one generation call can set. None fields take the mode's default (`resolve`).

    mode: "ar" | "blt-d" | "blt-s" | "blt-dv". max_bytes: generated ids (bytes) at most, >= 1.
    temperature 0 = greedy; top_k >= 1, top_p in (0, 1]; seed: the sampling generator's seed.
    k: BLT-S draft length (None: 16, or max_step - 1 on graphs that take fewer; `draft_length`).
    lookup: BLT-S and BLT-DV, greedy: draft from the context when the last `lookup` bytes (the
    pending byte included) occurred before (None: LOOKUP_MATCH, 8; 0: never, as the paper's modes).
    unmask / alpha / gamma: BLT-D and BLT-DV unmasking. block_start:
    "force" (the paper's rule: force-close the open patch, the block reads its latent) or
    "patch" (start the block at the open patch's first byte, reading the last closed latent);
    None: "force" for blt-d (the paper's Algorithm 1), "patch" for blt-dv (its output is ar's
    either way, and its drafts verify more often: 1.1-1.6x the bytes/s on the embedded default).
    stop: byte strings that end the output (not included in it). stop_on_eos: EOS ends the output.
    prefill_chunk: prompt bytes per prefill step, at most the graphs' max_step (None: max_step).
    logprobs: ar, blt-s, blt-dv: each generated id's log-probability under the model, and the
    `logprobs` most likely ids' (0: the generated id's only; None: none are computed).
    prompt_logprobs: every mode: each prompt id's after BOS, likewise (the prefill computes them).
    logit_bias: {byte: bias}: added to the logit of each byte (0-255) wherever a byte is chosen,
    drafted or verified, before temperature, top-k and top-p (OpenAI's logit_bias with a byte per
    token; -100 bans a byte, +100 all but forces it). Checked into sorted (byte, bias) pairs.
    presence_penalty / frequency_penalty: OpenAI's, in [-2, 2] (None: 0): where a byte is chosen,
    drafted or verified, each id's logit loses frequency_penalty x (times it was generated before)
    + presence_penalty (if it was at all). Generated ids only, not the prompt's.
    format: "json": the output is one JSON object (runtime/grammar.py): wherever a byte is chosen,
    drafted or verified, only bytes that keep it the beginning of one may be, and EOS only once it
    closed (a max_bytes or stop that comes first cuts it). ar, blt-s, blt-dv.
    schema: a JSON schema (a dict, or its JSON text; OpenAI's strict subset, grammar.compile_schema)
    the object must follow; implies format "json". Kept as JSON text.
    calls: tool calls in free text, JSON text {"start": str, "end": str, "most": int or null,
    "lead": bool, "schema": a call's JSON schema} (grammar.tagged; serve/tools.py builds it for a
    model's own call format): the output is free text in which each `start` opens one value of
    the schema, held to it and closed by `end`, at most `most` of them (`lead`: the text starts
    with one); EOS only in free text. Implies format "calls"; no schema with it.
    pattern: a regular expression the whole output is held to (runtime/pattern.py's subset, read
    as Python's re.fullmatch reads one: vLLM's structured outputs `regex`; `pattern.escape` joins
    choices into one): EOS only where the text matches. Implies format "regex"; no schema or
    calls with it. ar, blt-s, blt-dv.
    grammar: a context-free grammar the whole output is derived by (runtime/cfg.py: Lark's
    notation, or GBNF's; vLLM's structured outputs `grammar`): EOS only where the text is whole.
    Implies format "grammar"; no schema, calls or pattern with it. ar, blt-s, blt-dv.
    """

    mode: str = "blt-d"
    max_bytes: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    k: int | None = None
    lookup: int | None = None
    unmask: str | None = None
    alpha: float | None = None
    gamma: float | None = None
    block_start: str | None = None
    stop: tuple[bytes, ...] = ()
    stop_on_eos: bool = True
    prefill_chunk: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    format: str | None = None
    schema: str | None = None
    calls: str | None = None
    pattern: str | None = None
    grammar: str | None = None

    @cached_property  # a request's loops read it every byte
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.logit_bias, self.presence_penalty or 0.0,
                              self.frequency_penalty or 0.0)  # fmt: skip


# numbers.Integral / Real: numpy's scalars count (a service passes what its own code computed);
# the checked value comes back as a plain int / float, which batch cohorts and JSON records hold.
def _int(name: str, v: object, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
        want = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi}]"
        raise InputError(f"option {name}: expected {want}, got {v!r}")
    return int(v)


def _real(name: str, v: object, lo: float, hi: float, lo_open: bool = False) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        want = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise InputError(f"option {name}: expected a number in {want}, got {v!r}")
    return float(v)


def _stops(stop: object) -> tuple[bytes, ...]:
    items = [stop] if isinstance(stop, (str, bytes, bytearray)) else stop
    try:
        items = list(items)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"option stop: expected a string or a list of strings/bytes, got {stop!r}") from None
    out = []
    for s in items:
        if isinstance(s, str):
            try:
                s = s.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"option stop: {s!r} is not encodable as UTF-8 (a lone surrogate)") from None
        if not isinstance(s, (bytes, bytearray)) or len(s) == 0:
            raise InputError(f"option stop: expected non-empty strings or bytes, got {s!r}")
        out.append(bytes(s))
    return tuple(out)


def _biases(pairs: object) -> tuple[tuple[int, float], ...]:
    """(byte, bias) pairs, sorted by byte: each byte an int in [0, 255] once, each bias in
    [-100, 100] (OpenAI's range)."""
    try:
        items = [tuple(pair) for pair in pairs]  # type: ignore[attr-defined]
    except TypeError:
        raise InputError(f"option logit_bias: expected {{byte: bias}}, got {pairs!r:.80}") from None
    out: dict[int, float] = {}
    for item in items:
        if len(item) != 2:
            raise InputError(f"option logit_bias: expected (byte, bias) pairs, got {item!r:.80}")
        byte = _int("logit_bias byte", item[0], 0, 255)
        if byte in out:
            raise InputError(f"option logit_bias: byte {byte} is given twice")
        out[byte] = _real(f"logit_bias[{byte}]", item[1], -100.0, 100.0)
    return tuple(sorted(out.items()))


def make_options(**options: object) -> DecodeOptions:
    """Build DecodeOptions from keyword arguments; unknown names and bad values are InputErrors."""
    names = {f.name for f in dataclasses.fields(DecodeOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"option(s) {unknown}: unknown; known options are {sorted(names)}")
    if isinstance(options.get("logit_bias"), Mapping):
        options["logit_bias"] = tuple(options["logit_bias"].items())  # type: ignore[union-attr]
    elif options.get("logit_bias", ()) is None:
        options["logit_bias"] = ()
    if isinstance(options.get("schema"), Mapping):  # JSON text: DecodeOptions stay plain values
        options["schema"] = json.dumps(options["schema"], ensure_ascii=False)
    if "stop" in options and options["stop"] is not None:
        options["stop"] = _stops(options["stop"])
    elif "stop" in options:
        options["stop"] = ()
    return DecodeOptions(**options)  # type: ignore[arg-type]


def resolve(opts: DecodeOptions, config: BltConfig) -> DecodeOptions:
    """Check every value against the mode and the checkpoint; fill in the mode's defaults."""
    if opts.mode not in MODES:
        raise InputError(f"option mode: {opts.mode!r} is unknown; choose one of {', '.join(MODES)}")
    if opts.mode in ("blt-d", "blt-dv") and config.blt_d is None:
        raise CapabilityError(
            f"mode {opts.mode}: needs a BLT-D checkpoint (one with diffusion rows, config blt_d); "
            "this is a plain BLT checkpoint: use ar or blt-s"
        )
    plain = {"max_bytes": _int("max_bytes", opts.max_bytes, 1)}
    temperature = plain["temperature"] = _real("temperature", opts.temperature, 0.0, 100.0)
    if opts.top_k is not None:
        plain["top_k"] = _int("top_k", opts.top_k, 1)
    if opts.top_p is not None:
        plain["top_p"] = _real("top_p", opts.top_p, 0.0, 1.0, lo_open=True)
    if opts.seed is not None:
        plain["seed"] = _int("seed", opts.seed, 0, 2**63 - 1)
    if opts.k is not None:
        plain["k"] = _int("k", opts.k, 1, MAX_DRAFT)
        if opts.mode not in LOOKUP_MODES:  # silently ignored, it would also split batch cohorts
            raise InputError(f"option k: only blt-s and blt-dv draft; mode is {opts.mode}")
    lookup = opts.lookup
    if lookup is not None:
        lookup = _int("lookup", lookup, 0, MAX_LOOKUP)
        if opts.mode not in LOOKUP_MODES:
            raise InputError(f"option lookup: only blt-s and blt-dv draft from the context; mode is {opts.mode}")
        if lookup and temperature > 0:
            raise InputError(
                "option lookup: context drafts are for greedy decoding (temperature 0); "
                f"sampled {opts.mode} drafts with its own drafter (leave lookup unset, or 0)"
            )
    elif opts.mode in LOOKUP_MODES:
        lookup = LOOKUP_MATCH if temperature == 0 else 0
    if opts.prefill_chunk is not None:
        plain["prefill_chunk"] = _int("prefill_chunk", opts.prefill_chunk, 1)
    if opts.logprobs is not None:
        plain["logprobs"] = _int("logprobs", opts.logprobs, 0, MAX_LOGPROBS)
        if opts.mode not in CAUSAL_MODES:
            raise InputError(
                f"option logprobs: {opts.mode}'s bytes come from its diffusion head, not from the model's "
                "causal distribution; ask ar, blt-s or blt-dv (their bytes are ar's)"
            )
    if opts.prompt_logprobs is not None:
        plain["prompt_logprobs"] = _int("prompt_logprobs", opts.prompt_logprobs, 0, MAX_LOGPROBS)
    if opts.logit_bias:
        plain["logit_bias"] = _biases(opts.logit_bias)
    for name in ("presence_penalty", "frequency_penalty"):  # None: 0, as OpenAI's clients send "not set"
        penalty = getattr(opts, name)
        plain[name] = 0.0 if penalty is None else _real(name, penalty, -2.0, 2.0)
    fmt = opts.format
    if (own := _own_format(opts)) is not None:
        fmt = plain["format"] = own
    elif opts.schema is not None:
        if not isinstance(opts.schema, str):
            raise InputError(f"option schema: expected a JSON schema (a dict or JSON text), got {opts.schema!r:.80}")
        compiled(opts.schema)  # InputError naming what it cannot hold a text to
        fmt = plain["format"] = fmt or "json"
    if fmt is not None:
        implied = any(fmt == own_fmt and getattr(opts, name) is not None for name, own_fmt, *_ in OWN_FORMATS)
        if fmt not in FORMATS and not implied:
            raise InputError(f"option format: {fmt!r} is unknown; choose one of {', '.join(FORMATS)}")
        if opts.mode not in CAUSAL_MODES:
            raise InputError(
                f"option format: {opts.mode}'s diffusion head chooses a block's bytes out of order, where a "
                "grammar reads them in order; ask ar, blt-s or blt-dv"
            )
    if opts.block_start is not None and opts.block_start not in BLOCK_START_RULES:
        raise InputError(f"option block_start: {opts.block_start!r} is unknown; choose one of {BLOCK_START_RULES}")
    if opts.block_start not in (None, "force") and opts.mode not in UNMASK_RULES:
        raise InputError(f"option block_start: only blt-d and blt-dv start diffusion blocks; mode is {opts.mode}")
    plain["block_start"] = opts.block_start or ("patch" if opts.mode == "blt-dv" else "force")
    if not isinstance(opts.stop_on_eos, bool):
        raise InputError(f"option stop_on_eos: expected True or False, got {opts.stop_on_eos!r}")
    stop = _stops(opts.stop)
    unmask, alpha, gamma = opts.unmask, opts.alpha, opts.gamma
    if opts.mode in UNMASK_RULES:
        rules = UNMASK_RULES[opts.mode]
        unmask = rules[0] if unmask is None else unmask
        if unmask not in rules:
            raise InputError(f"option unmask: {unmask!r} is not a {opts.mode} rule; choose one of {rules}")
        alpha = _real("alpha", (0.7 if opts.mode == "blt-d" else 0.3) if alpha is None else alpha, 0.0, 1.0)
        gamma = _real("gamma", (1.0 if opts.mode == "blt-d" else 1.5) if gamma is None else gamma, 0.0, 1e6)
    elif unmask is not None or alpha is not None or gamma is not None:
        raise InputError(f"options unmask/alpha/gamma: only blt-d and blt-dv unmask; mode is {opts.mode}")
    return dataclasses.replace(opts, lookup=lookup, unmask=unmask, alpha=alpha, gamma=gamma, stop=stop, **plain)


@dataclass(frozen=True)
class Request:
    """A prompt and its options, checked once against a checkpoint's config (`make_request`).

    A Generator runs it as given; what only the Generator knows (its `max_context`) is checked when
    it runs. Services build requests on admission, so bad input is refused before any work.
    """

    ids: tuple[int, ...]  # BOS + prompt ids
    opts: DecodeOptions
    # where it queues for a row in a batch (lower first; equal ones in arrival order): it orders
    # requests, never what one computes
    priority: int = 0


# options whose text is a format of its own, in the order they are read: (option, its format, what
# the output then is, what the option's text is, its compiler: InputError naming what it cannot hold)
OWN_FORMATS = (("grammar", GRAMMAR, "a text held to a grammar", "a grammar's text (a string)", derived),
               ("pattern", REGEX, "a text held to a regular expression", "a regular expression (a string)", matching),
               ("calls", CALLS, "free text with calls", "JSON text", tagged))  # fmt: skip


def _own_format(opts: DecodeOptions) -> str | None:
    """The format of the first own-format option given (checked and compiled), or None."""
    for i, (name, fmt, output, text, compile_) in enumerate(OWN_FORMATS):
        value = getattr(opts, name)
        if value is None:
            continue
        others = [n for n, *_ in OWN_FORMATS[i + 1 :] if getattr(opts, n) is not None]
        if others or opts.schema is not None or opts.format not in (None, fmt):
            rest = ", ".join(["format", "schema", *(n for n, *_ in OWN_FORMATS[i + 1 :])])
            raise InputError(f"option {name}: {output} is a format of its own; give no {rest}")
        if not isinstance(value, str):
            raise InputError(f"option {name}: expected {text}, got {value!r:.80}")
        compile_(value)
        return fmt
    return None


def make_request(
    prompt: str | bytes,
    config: BltConfig,
    mode: str = "blt-d",
    max_bytes: int = 256,
    priority: int = 0,
    **options: object,
) -> Request:
    """Encode `prompt` (str: UTF-8; bytes: as is) and resolve the options for `config`; InputError,
    CapabilityError name what is wrong."""
    opts = resolve(make_options(mode=mode, max_bytes=max_bytes, **options), config)
    return Request(tuple(encode(prompt)), opts, _priority(priority))


def _priority(v: object) -> int:
    return _int("priority", v, -(2**31), 2**31 - 1)


def checked(req: Request, config: BltConfig) -> Request:
    """`req` as make_request would have made it: a Request built or replaced by hand is checked
    again (ids in the vocabulary, options against the mode and checkpoint) rather than trusted."""
    ids = req.ids
    if not isinstance(req, Request) or not isinstance(ids, tuple) or not ids:
        raise InputError(f"request: expected a Request with a tuple of ids (make_request), got {req!r:.80}")
    if not all(type(i) is int for i in ids) or min(ids) < 0 or max(ids) >= VOCAB_SIZE:
        raise InputError(f"request ids: expected ints in [0, {VOCAB_SIZE}) (make_request encodes a prompt)")
    if not isinstance(req.opts, DecodeOptions):
        raise InputError(f"request opts: expected DecodeOptions, got {type(req.opts).__name__}")
    return Request(ids, resolve(req.opts, config), _priority(req.priority))


def draft_length(opts: DecodeOptions, max_step: int) -> int:
    """blt-s drafts per round: `k`, or by default DEFAULT_K where a verify step of k + 1 positions
    fits the graphs, else max_step - 1 (an explicit k that does not fit is refused by check_fit)."""
    return opts.k if opts.k is not None else max(1, min(DEFAULT_K, max_step - 1))


def check_fit(req: Request, max_step: int, max_context: int | None = None) -> None:
    """What the step graphs and the engine bound: a prefill chunk and a blt-s verify step fit one
    call (max_step positions); prompt + max_bytes fit `max_context` when one is set."""
    opts = req.opts
    if opts.prefill_chunk is not None and opts.prefill_chunk > max_step:
        raise InputError(f"option prefill_chunk: {opts.prefill_chunk} exceeds the graphs' max_step {max_step}")
    if opts.mode == "blt-s" and opts.k is not None and opts.k + 1 > max_step:
        raise InputError(f"option k: {opts.k} drafts + 1 exceed the graphs' max_step {max_step} (one verify step)")
    need = len(req.ids) + opts.max_bytes
    if max_context is not None and need > max_context:
        raise InputError(
            f"prompt + max_bytes: {len(req.ids)} prompt ids + {opts.max_bytes} bytes = {need} exceed "
            f"max_context {max_context}; lower max_bytes or raise max_context"
        )
