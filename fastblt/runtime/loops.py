"""The four decoding loops, built from named steps: prefill, draft, verify, accept, commit.

Every loop starts after `prefill` with the logits of the last prompt position and works in
*rounds*. The AR-style loops (ar, blt-s, blt-dv) keep one *pending* byte c: the next byte, already
certain under AR semantics (the argmax, or a draw, of exact logits) but not yet appended.

- ar:     append([c]) -> logits -> next c. One entropy, encoder and decoder step per byte, one
          global step per closed patch; greedy output equals a full recompute on every prefix.
- blt-s:  draft k bytes after c with the decoder alone, reading the latest closed latent (new
          patch boundaries ignored); verify [c, d_1..d_k] in one append (encoder states already
          written by the draft: they do not depend on patching); accept; roll back the rest.
- blt-dv: draft the block [c, MASK...] with the diffusion head; verify [c, drafts] as blt-s.
- blt-s and blt-dv, greedy: a round whose last bytes occurred before drafts what followed them
          instead (runtime/lookup.py), with no draft call; the verify pass encodes those drafts.
- blt-d:  denoise a block of [MASK]s with the diffusion head, then commit it (no verification).

Each loop is a plan (calls.py): a generator that yields the step calls of its sequence (run by a
Generator one at a time, or by the batch engine together with other sequences') and yields None
after every round that produced verified bytes, so `Generator.stream` and the batch engine can
hand text out as it is verified. Per-round host syncs (the accepted length, the next byte) are
marked `# host sync:`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fastblt.model.config import EOS_ID
from fastblt.runtime import grammar
from fastblt.runtime.calls import Plan
from fastblt.runtime.lookup import continuation
from fastblt.runtime.options import DecodeOptions, draft_length
from fastblt.runtime.prompt_cache import Kept, PromptCache, PromptScores, prompt_keys, split_points
from fastblt.runtime.sampling import (
    Rng,
    SamplingParams,
    confidence_unmask,
    entropy_bound_unmask,
    entropy_of,
    greedy_accept,
    penalty,
    pick,
    probs_from_logits,
    sample,
    speculative_accept,
    steer,
)
from fastblt.runtime.state import SequenceState
from fastblt.runtime.stats import RoundStats
from fastblt.runtime.stream import Output


@dataclass
class Run:
    """One call's context: the sequence, its options, where verified bytes go, the RNG."""

    state: SequenceState
    opts: DecodeOptions
    out: Output
    gen: Rng | None  # the request's sampling generator (None when greedy)
    rounds: RoundStats
    prefill: dict = field(default_factory=dict)  # when the prompt was committed, and its counters
    prompt_logits: np.ndarray | None = None  # the last prompt position's, once the prompt is committed
    # blt-s / blt-dv may draft from the context: a batch allows it for a round only when every row
    # of the cohort starting it can (a row that skipped drafting would only wait for the others'
    # drafts; greedy bytes are the same either way)
    lookup: bool = True
    # current_penalties(): how often each id was generated (of out.ids' first `counted`), and
    # what that takes off its logit
    counts: np.ndarray | None = None
    penalties: np.ndarray | None = None
    counted: int = 0
    # current_grammar(): with a format, the grammar's state after out.ids' first `parsed`
    grammar_state: grammar.State | None = None
    parsed: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.opts.sampling

    def is_eos(self, t: int) -> bool:
        return t == EOS_ID and self.opts.stop_on_eos


# a drafter is a plan given (run, pending byte c, at most k drafts) that returns (drafts, q (len, V)
# or None); blt-s drafters must also write the encoder states of [c, d_1..d_len] at n..n+len (verify
# skips them)
Drafter = Callable[[Run, int, int], Plan[tuple[list[int], np.ndarray | None]]]


# ------------------------------------------------------------------------ shared steps
def prefill(
    state: SequenceState, ids: list[int], chunk: int, out: Output | None = None, lo: int = 0, hi: int | None = None
) -> Plan[np.ndarray]:
    """Commit ids[lo:hi] in chunks; returns the last position's next-byte logits (V,). When `out`
    scores the prompt, each prompt id after BOS is scored under its position's logits."""
    hi = len(ids) if hi is None else hi
    if out is None or out.prompt_logprobs is None:
        return (yield from state.prefill(ids[lo:hi], chunk))
    done = lo

    def score(rows: np.ndarray) -> None:  # row j predicts ids[j + 1]; the last predicts the output
        nonlocal done
        out.score_prompt(ids[done + 1 : done + 1 + len(rows)], rows)
        done += len(rows)

    return (yield from state.prefill(ids[lo:hi], chunk, score))


def generate(run: Run, ids: list[int], chunk: int, prompts: PromptCache | None = None) -> Plan[None]:
    """A whole call: commit the prompt (its time and step counters kept in `run.prefill`), then
    the mode's loop until `run.out` is done.

    The prompt is committed in parts split at its split points (prompt_cache.py). With `prompts`,
    it starts from the deepest point a snapshot is kept at (one carrying the prompt's scores when
    it scores its prompt), and keeps snapshots at its own two deepest points (its cut, and the
    stride point below it)."""
    st, out = run.state, run.out
    run.prefill["t_start"] = time.perf_counter()
    top_n = out.prompt_top_n  # None: the prompt is not scored
    keys = prompt_keys(ids, chunk) if prompts is not None and prompts.budget else []
    found = prompts.find(keys, ids, top_n) if keys else None
    start = 0
    if found is not None:
        start, kept = found
        st.load(kept.snap)
        if top_n is not None:
            logprobs, tops = kept.scores.lists(top_n)
            out.prompt_logprobs += logprobs
            out.prompt_top_logprobs += tops
        run.prefill["cached"] = start
    keep, rank = dict(keys[:2]), -1 if top_n is None else top_n
    for point in split_points(len(ids), chunk):
        if point > start:
            yield from prefill(st, ids, chunk, out, start, point)
            start = point
            if point not in keep:
                continue
            size = st.saved_bytes() + (0 if top_n is None else PromptScores.size(point, top_n))
            if prompts.wants(keep[point], size, rank):
                scores = None if top_n is None else PromptScores.of(out.prompt_logprobs, out.prompt_top_logprobs, top_n)
                prompts.put(keep[point], Kept(st.save(copy=False), scores))
    logits = yield from prefill(st, ids, chunk, out, start)
    yield from resume(run, logits)


def resume(run: Run, logits: np.ndarray) -> Plan[None]:
    """From a committed prompt (this call's own prefill, or a copy of another request's) whose last
    position's next-byte logits are `logits`: its end and counters kept in `run.prefill`, then the
    mode's loop until `run.out` is done."""
    st = run.state
    run.prefill |= dict(t_end=time.perf_counter(), calls=dict(st.calls), positions=dict(st.positions),
                        backend_s=st.backend_seconds)  # fmt: skip
    run.prompt_logits = logits
    yield from LOOPS[run.opts.mode](run, logits)


def next_byte(run: Run, logits: np.ndarray) -> int:
    """The pending byte after exact logits (V,): argmax, or a draw when sampling."""
    steering = _masked(current_penalties(run), current_grammar(run))
    return int(pick(logits, run.params, run.gen, steering))  # host sync: the next byte


def verify(run: Run, c: int, drafts: list[int], encoded: bool) -> Plan[np.ndarray]:
    """One causal pass over [c, d_1..d_k] at n..n+k (entropy, encoder unless encoded, global,
    decoder) -> logits (k+1, V); row j predicts the byte after position n+j."""
    return (yield from run.state.append([c, *drafts], encoded=encoded))


def accept(run: Run, drafts: list[int], q: np.ndarray | None, logits: np.ndarray) -> tuple[int, int]:
    """Accepted draft count and the next pending byte (correction or bonus). With penalties, row j
    counts the drafts before it as generated, and with a format it reads the grammar after them:
    they are generated, if it is reached."""
    rows = current_penalties(run)
    if rows is not None:
        rows = np.repeat(rows[None], len(logits), axis=0)
        times: dict[int, int] = {}
        for j, d in enumerate(drafts):
            rows[j + 1 :, d] = _drafted(run, times, d)
    g = current_grammar(run)
    if g is not None:
        masks = [grammar.mask(g)]
        for d in drafts:  # a draft the grammar refuses is refused at its row; rows after it go unread
            g = grammar.advance(g, [d]) or g
            masks.append(grammar.mask(g))
        rows = np.stack(masks) + (0 if rows is None else rows)  # a row per position verified
    if run.params.greedy:
        return greedy_accept(drafts, steer(logits, run.params, rows))
    return speculative_accept(drafts, q, probs_from_logits(logits, run.params, rows), run.gen)


def _drafted(run: Run, times: dict[int, int], d: int) -> float:
    """The penalty on id d once draft d is generated too (`times`: this round's drafts' counts so
    far, on top of `run.counts`)."""
    times[d] = times.get(d, run.counts[d]) + 1
    return penalty(run.params, times[d])


def current_grammar(run: Run) -> grammar.State | None:
    """With a format, the grammar's state after the ids generated so far (kept up to date as ids
    are verified); None without one."""
    if run.opts.format is None:
        return None
    ids = run.out.ids
    if run.grammar_state is None or run.parsed > len(ids):
        opts = run.opts
        root = (grammar.tagged(opts.calls) if opts.calls is not None else grammar.matching(opts.pattern)
                if opts.pattern is not None else grammar.derived(opts.grammar) if opts.grammar is not None
                else grammar.JSON_OBJECT if opts.schema is None else grammar.compiled(opts.schema))  # fmt: skip
        run.grammar_state, run.parsed = grammar.begin(root), 0
    state = grammar.advance(run.grammar_state, ids[run.parsed :])
    if state is None:  # every id was chosen under the grammar's mask
        raise AssertionError(f"format {run.opts.format}: generated ids {ids[run.parsed :]} break its grammar")
    run.grammar_state, run.parsed = state, len(ids)
    return state


def _masked(penalties: np.ndarray | None, state: grammar.State | None) -> np.ndarray | None:
    """Penalties (V,) plus the grammar's mask in `state` (+inf on the ids it refuses)."""
    if state is None:
        return penalties
    mask = grammar.mask(state)
    return mask if penalties is None else penalties + mask


def current_penalties(run: Run) -> np.ndarray | None:
    """What the request's penalties take off each id's logit now (V,) float32, for the ids
    generated so far (kept up to date as ids are verified; `run.counts` counts them); None without
    penalties. Shared: copy it to change it."""
    if not run.params.penalized:
        return None
    ids = run.out.ids
    if run.counts is None or run.counted > len(ids):
        V = run.state.config.vocab_size
        run.counts, run.penalties, run.counted = np.zeros(V, dtype=np.int64), np.zeros(V, dtype=np.float32), 0
    for t in ids[run.counted :]:  # a few ids per call: cheaper than numpy's scatter
        run.counts[t] += 1
        run.penalties[t] = penalty(run.params, run.counts[t])
    run.counted = len(ids)
    return run.penalties


def rollback_to_accepted(run: Run, n0: int, drafts: list[int], a: int) -> None:
    """Keep c and the a accepted drafts; everything after them is forgotten (O(1))."""
    run.state.rollback(n0 + 1 + a)
    run.rounds.verified(len(drafts), a)


def _from_context(run: Run, c: int, k: int) -> list[int]:
    st = run.state
    return continuation(st.host.tokens[: st.n], c, run.opts.lookup, k) if run.opts.lookup else []


def draft_context(run: Run, c: int) -> list[int]:
    """Greedy drafting from the context (runtime/lookup.py): free, so as many drafts as one
    verify step takes; [] when the last `lookup` bytes never occurred before, or lookup is off."""
    st = run.state
    return _from_context(run, c, min(st.max_step, run.out.remaining, st.draft_room() + 1) - 1) if run.lookup else []


def context_ready(run: Run) -> bool:
    """At the end of a blt-s / blt-dv round (its pending byte last in the output): whether the
    context has drafts for the next round, whatever `run.lookup` says."""
    return bool(run.out.ids and _from_context(run, run.out.ids[-1], 1))


def draft_round(run: Run, c: int, k: int, drafter: Drafter) -> Plan[tuple[list[int], np.ndarray | None, bool]]:
    """A verified round's drafts: from the context where it repeats, else up to k from the
    mode's drafter. Returns (drafts, q, whether they came from the context)."""
    drafts = draft_context(run, c)
    if drafts:
        return drafts, None, True
    drafts, q = yield from drafter(run, c, k)
    return drafts, q, False


# ------------------------------------------------------------------------ ar
def ar(run: Run, logits: np.ndarray) -> Plan[None]:
    """Plain BLT: one byte per round."""
    c = next_byte(run, logits)
    while not run.out.push((c,), logits[None]):
        yield None
        run.rounds.rounds += 1
        logits = (yield from run.state.append([c]))[0]  # commit c, get the next pending byte
        c = next_byte(run, logits)


# ------------------------------------------------------------------------ blt-s
def draft_ar(run: Run, c: int, k: int) -> Plan[tuple[list[int], np.ndarray | None]]:
    """BLT-S drafting: up to k bytes after c from the decoder alone, reading the latest closed
    latent. Writes encoder states (exact) and decoder cache entries (scratch) at n..n+len."""
    st = run.state
    n, read = st.n, np.array([st.g_len - 1])
    drafts: list[int] = []
    qs: list[np.ndarray] = []
    x = c
    pen = current_penalties(run)
    pen = None if pen is None else pen.copy()  # with the drafts, counted as verify will count them
    g = current_grammar(run)  # likewise, read after them
    times: dict[int, int] = {}
    for j in range(k):
        yield from st.run_encoder(n + j, np.array([x]))
        logits = (yield from st.run_decoder(n + j, 1, read))[0]
        steering = _masked(pen, g)
        if run.params.greedy:
            x = int(pick(logits, run.params, None, steering))  # host sync: the draft byte feeds the next step
        else:
            qs.append(probs_from_logits(logits, run.params, steering))
            x = int(sample(qs[-1], run.gen))  # host sync: as above
        drafts.append(x)
        if pen is not None:
            pen[x] = _drafted(run, times, x)
        if g is not None:
            g = grammar.advance(g, [x])
        if run.is_eos(x):
            break
    yield from st.run_encoder(n + len(drafts), np.array([x]))  # the last draft's state, for verify
    return drafts, np.stack(qs) if qs else None


def blt_s(run: Run, logits: np.ndarray, drafter: Drafter = draft_ar) -> Plan[None]:
    """Self-speculation: draft k, verify in one pass, accept the agreeing prefix plus one byte.
    A greedy round whose context repeats drafts the bytes that followed instead (no draft calls)."""
    c = next_byte(run, logits)
    while not run.out.push((c,), logits[None]):
        yield None
        n0 = run.state.n
        # the byte after the last draft is free
        k = min(draft_length(run.opts, run.state.max_step), run.out.remaining - 1, run.state.draft_room())
        drafts, q, looked = yield from draft_round(run, c, k, drafter)
        # the drafter wrote the encoder states of its drafts; context drafts have none yet
        checked = yield from verify(run, c, drafts, encoded=not looked)
        a, c = accept(run, drafts, q, checked)
        if looked:
            run.rounds.looked_up(len(drafts), a)
        rollback_to_accepted(run, n0, drafts, a)
        logits = checked[a]  # what the next pending byte c was drawn after
        if run.out.push(drafts[:a], checked):
            return


# ------------------------------------------------------------------------ diffusion blocks
def block_start(run: Run, pending: list[int]) -> Plan[tuple[int, int, list[int]]]:
    """Where the next block starts, the latent it reads, and its known leading ids.

    "force" (the paper): the block starts at n; an open patch is force-closed by a global step
    whose latent the block reads (the next commit overwrites that slot: an O(1) rollback).
    "patch": the block starts at the open patch's first byte s and reads the last closed latent,
    as in training; the open patch's committed bytes (and the pending byte) fill its first cells.
    When they would leave no [MASK] cell, this round falls back to "force". At the global model's
    position limit, where a forced latent has no slot, a "force" round starts as "patch" does.
    """
    st, B = run.state, run.state.config.blt_d.block_size
    if run.opts.block_start == "patch" or st.g_len >= st.patch_limit:
        s = st.open_patch_start()
        known = [int(t) for t in st.tokens[s : st.n]] + pending
        if len(known) < B:
            return s, st.g_len - 1, known
        run.rounds.block_start_fallbacks += 1
    return st.n, (yield from st.force_close()), list(pending)


def denoise(
    run: Run, block: np.ndarray, first: int, need: int, read: int, at: int, rule: str
) -> Plan[np.ndarray | None]:
    """Unmask block cells first..first+need-1 (in place) with the diffusion head.

    rule: "one-step" (every masked cell at once), "confidence" (>= alpha, at least one) or
    "entropy" (ascending entropies summing to <= gamma, at least one). Cells past an unmasked EOS
    are not waited for. Returns q (B, V): each cell's distribution when it was unmasked (sampling).
    """
    st, params = run.state, run.params
    pen = current_penalties(run)  # for the ids before the block: its cells are not chosen in order
    mask_id = st.config.blt_d.mask_id
    masked = block == mask_id  # numpy on the host, as the logits: torch calls cost more there (calls.py)
    q = None if params.greedy else np.zeros((len(block), st.config.vocab_size), dtype=np.float32)
    end, steps = first + need, 0
    while masked[first:end].any():  # host sync: one per diffusion step
        logits = yield from st.run_block(block, read, at)  # (B, V)
        probs = probs_from_logits(logits, params, pen) if rule != "one-step" or q is not None else None
        tok = pick(logits, params, None, pen) if params.greedy else sample(probs, run.gen)
        if rule == "one-step":
            chosen = masked.copy()
        elif rule == "confidence":
            confidence = probs[np.arange(len(tok)), tok]
            chosen = confidence_unmask(confidence, masked, run.opts.alpha)
        else:
            chosen = entropy_bound_unmask(entropy_of(probs), masked, run.opts.gamma)
        block[chosen] = tok[chosen]
        if q is not None:
            q[chosen] = probs[chosen]
        masked &= ~chosen
        steps += 1
        if run.opts.stop_on_eos:
            eos = np.flatnonzero(block[first:end] == EOS_ID)
            end = first + int(eos[0]) + 1 if len(eos) else end
    run.rounds.unmask_steps[steps] += 1
    return q


def draft_block(run: Run, pending: list[int], need: int, rule: str) -> Plan[tuple[list[int], np.ndarray | None]]:
    """A diffusion block after the committed bytes: returns its first `need` new cells and their q."""
    at, read, known = yield from block_start(run, pending)
    B = run.state.config.blt_d.block_size
    block = np.full(B, run.state.config.blt_d.mask_id, dtype=np.int64)
    block[: len(known)] = known
    need = min(need, B - len(known))
    q = yield from denoise(run, block, len(known), need, read, at, rule)
    cells = slice(len(known), len(known) + need)
    return [int(t) for t in block[cells]], None if q is None else q[cells]


# ------------------------------------------------------------------------ blt-d
def blt_d(run: Run, logits: np.ndarray) -> Plan[None]:
    """Block diffusion: denoise B cells, commit them, repeat. The prefill logits are unused."""
    del logits
    while True:
        new, _ = yield from draft_block(run, [], run.out.remaining, run.opts.unmask)
        run.rounds.rounds += 1
        if run.out.push(new):
            return
        yield None
        # commit: entropy, encoder, global for the closed patches (and, for the "force" rule, the
        # next block's force-closed patch in the same global pass), decoder cache
        yield from run.state.append(new, close_open=run.opts.block_start == "force")


# ------------------------------------------------------------------------ blt-dv
def draft_diffusion(run: Run, c: int, k: int) -> Plan[tuple[list[int], np.ndarray | None]]:
    """BLT-DV drafting: the block [c, MASK...] unmasked by the diffusion head (one step by default);
    up to k drafts, cut after a drafted EOS (nothing after it can be output)."""
    if k <= 0:
        return [], None
    drafts, q = yield from draft_block(run, [c], k, run.opts.unmask)
    for j, t in enumerate(drafts):
        if run.is_eos(t):
            return drafts[: j + 1], None if q is None else q[: j + 1]
    return drafts, q


def blt_dv(run: Run, logits: np.ndarray, drafter: Drafter = draft_diffusion) -> Plan[None]:
    """Diffusion draft + autoregressive verification: greedy output identical to ar. A greedy
    round whose context repeats drafts the bytes that followed instead (no diffusion pass)."""
    c = next_byte(run, logits)
    while not run.out.push((c,), logits[None]):
        yield None
        n0 = run.state.n
        # the byte after the last draft is free; [c, drafts] must fit one verify step
        k = min(run.out.remaining, run.state.max_step, run.state.draft_room() + 1) - 1
        drafts, q, looked = yield from draft_round(run, c, k, drafter)
        checked = yield from verify(run, c, drafts, encoded=False)
        a, c = accept(run, drafts, q, checked)
        if looked:
            run.rounds.looked_up(len(drafts), a)
        rollback_to_accepted(run, n0, drafts, a)
        logits = checked[a]  # what the next pending byte c was drawn after
        if run.out.push(drafts[:a], checked):
            return


LOOPS: dict[str, Callable[..., Plan[None]]] = {"ar": ar, "blt-d": blt_d, "blt-s": blt_s, "blt-dv": blt_dv}
