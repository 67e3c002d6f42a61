"""A JSON number's text held to bounds (`minimum`, `maximum` and their exclusive forms, any
decimals) and a `multipleOf`, as DFAs over its characters that the grammar (grammar.py) runs as it
reads a number, the way pattern.py's automata run inside a string.

Each bound is a DFA comparing the text's digits with the bound's as they come (the integer part's
length first, then digit by digit; the sign at the end); a multiple is a DFA of the digits'
remainder. Their product, minimized (Moore), is one Pattern whose reading is a single state, so a
bounded multiple costs no more per byte than a plain number. A number is written one way: no
exponent, no leading zero, no "-0"; a multiple with at most its decimals.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from functools import lru_cache

from fastblt.errors import InputError
from fastblt.runtime.courtesy import pause
from fastblt.runtime.pattern import BIG_CACHE, MAX_PAIRS, MAX_STATES, Pattern, kept, note_built, trimmed

Dfa = tuple[tuple[dict[str, int], ...], tuple[bool, ...]]  # state -> character -> state (0 the start), finals


def number_pattern(low: tuple[Decimal, bool] | None, high: tuple[Decimal, bool] | None,
                   multiple: tuple[int, int] | None, integer: bool, at: str) -> Pattern | None:  # fmt: skip
    """The JSON numbers (integers if `integer`) above `low` and below `high` ((bound, open), any
    decimal; None: no bound) that are multiples of `multiple` ((digits, places): 0.25 is (25, 2);
    None: any), written one way (no exponent, "-0" or leading zero; a multiple with at most its
    places of decimals). A DFA per bound compares the text's digits with the bound's, one for the
    multiple moves the digits' remainder; their product, minimized. None when no number holds."""
    if multiple is not None and multiple[0] * (multiple[1] + 1) * 2 > MAX_STATES:
        step, places = multiple
        raise InputError(f"option {at}.multipleOf: {Decimal(step).scaleb(-places)} is not held: its digits without "
                         f"the point ({step}) times its decimals plus one are past {MAX_STATES // 2:,}")  # fmt: skip
    try:
        pat = _number(low, high, multiple, integer)
    except InputError as e:
        raise InputError(f"option {at}: {e}") from None
    return pat if pat.start else None


@lru_cache(maxsize=BIG_CACHE)
def _number(low: tuple[Decimal, bool] | None, high: tuple[Decimal, bool] | None, multiple: tuple[int, int] | None,
            integer: bool) -> Pattern:  # fmt: skip
    parts = [f"{r}{'' if b[1] else '='} {b[0]}" for b, r in ((low, ">"), (high, "<")) if b]
    dfas = [_compared(b[0], r + ("" if b[1] else "="), integer) for b, r in ((low, ">"), (high, "<")) if b]
    if multiple is not None:
        parts.append(f"multiple of {Decimal(multiple[0]).scaleb(-multiple[1])}")
        dfas.append(_multiple(*multiple, integer))
    dfa = dfas[0]
    for other in dfas[1:]:
        table, final = _product(dfa, other)
        # minimizing pays where states repeat (two bounds); a product with a multiple's many
        # remainders is taken as it is (Moore's passes over 20,000 states cost about a second)
        dfa = _minimal(table, final) if len(table) <= MAX_STATES else (tuple(table), tuple(final))
    return kept(_pattern(dfa, "numbers " + ", ".join(parts)))


def _product(a: Dfa, b: Dfa) -> tuple[list[dict[str, int]], list[bool]]:
    """The DFA of the texts both take: a pair of states per state, as far as the pairs are reached."""
    ids, todo = {(0, 0): 0}, [(0, 0)]
    table: list[dict[str, int]] = [{}]
    final = [a[1][0] and b[1][0]]
    while todo:
        pause()
        x, y = pair = todo.pop()
        for c, t in a[0][x].items():
            if c in b[0][y]:
                nxt = (t, b[0][y][c])
                if nxt not in ids:
                    if len(ids) >= MAX_PAIRS:
                        raise InputError(f"more than {MAX_PAIRS:,} states together")
                    ids[nxt] = len(table)
                    table.append({})
                    final.append(a[1][nxt[0]] and b[1][nxt[1]])
                    todo.append(nxt)
                table[ids[pair]][c] = ids[nxt]
    return table, final


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


@lru_cache(maxsize=256)
def _compared(bound: Decimal, relation: str, integer: bool) -> Dfa:
    """The DFA of the numbers x with `x relation bound` (">", ">=", "<", "<="): the text's digits
    are compared with the bound's as they come (its integer part's length decides first, then digit
    by digit), the sign at the end."""
    whole, _, fraction = format(abs(bound), "f").partition(".")
    whole, fraction = whole.lstrip("0"), fraction.rstrip("0")
    width = len(whole)

    def in_whole(neg: bool, k: int, cmp: int, d: int) -> tuple:  # k digits read, cmp: them vs the bound's
        if k >= width:
            return ("int", neg, width + 1, 1)  # longer: larger
        return ("int", neg, k + 1, cmp or _sign(d - int(whole[k])))

    def in_fraction(neg: bool, cmp: int, j: int, zero: bool, d: int) -> tuple:
        if cmp == 0:  # equal so far: the next digit against the bound's j-th
            cmp, j = _sign(d - (int(fraction[j]) if j < len(fraction) else 0)), min(j + 1, len(fraction))
        return ("frac", neg, cmp, j, zero and d == 0)

    def whole_cmp(k: int, cmp: int) -> int:
        return -1 if k < width else 1 if k > width else cmp

    def moves(state: tuple) -> list[tuple[str, tuple]]:
        kind, point = state[0], not integer
        if kind in ("start", "minus"):
            neg = kind == "minus"
            return [("-", ("minus",))] * (not neg) + [("0", ("zero", neg))] + [
                (str(d), in_whole(neg, 0, 0, d)) for d in range(1, 10)]  # fmt: skip
        if kind == "zero":
            return [(".", ("point", state[1], 0 if width == 0 else -1, True))] * point
        if kind == "int":
            _, neg, k, cmp = state
            return [(str(d), in_whole(neg, k, cmp, d)) for d in range(10)] + [
                (".", ("point", neg, whole_cmp(k, cmp), False))] * point  # fmt: skip
        _, neg, cmp, *rest = state  # "point" (cmp of the integer parts, zero) or "frac" (cmp, j, zero)
        j, zero = (0, rest[0]) if kind == "point" else rest
        return [(str(d), in_fraction(neg, cmp, j, zero, d)) for d in range(10)]

    def holds(state: tuple) -> bool:
        kind = state[0]
        if kind == "zero":
            neg, zero, size = state[1], True, 0 if width == 0 and not fraction else -1
        elif kind == "int":
            neg, zero, size = state[1], False, whole_cmp(state[2], state[3]) or -bool(fraction)
        elif kind == "frac":
            _, neg, cmp, j, zero = state
            size = cmp or -(j < len(fraction))
        else:
            return False
        if neg and zero:  # "-0" and "-0.00" are not written
            return False
        x_sign, b_sign = -1 if neg else 1, -1 if bound < 0 else 1
        order = size * x_sign if x_sign == b_sign else x_sign
        return {">": order > 0, ">=": order >= 0, "<": order < 0, "<=": order <= 0}[relation]

    return _explored(moves, holds)


def _explored(moves: Callable[[tuple], list[tuple[str, tuple]]], holds: Callable[[tuple], bool]) -> Dfa:
    """The DFA whose states `moves` (state -> [(character, state)]) reaches from ("start",), final
    where `holds`, minimized."""
    ids, todo = {("start",): 0}, [("start",)]
    table: list[dict[str, int]] = [{}]
    final = [holds(("start",))]
    while todo:
        pause()
        state = todo.pop()
        for c, nxt in moves(state):
            if nxt not in ids:
                ids[nxt] = len(table)
                table.append({})
                final.append(holds(nxt))
                todo.append(nxt)
            table[ids[state]][c] = ids[nxt]
    note_built(len(table))
    return _minimal(table, final)


@lru_cache(maxsize=256)
def _multiple(step: int, places: int, integer: bool) -> Dfa:
    def moves(state: tuple) -> list[tuple[str, tuple]]:
        kind = state[0]
        digits = [(str(d), d) for d in range(10)]
        if kind in ("start", "minus"):
            return [("-", ("minus",))] * (kind == "start") + [("0", ("zero", kind == "minus"))] + [
                (c, ("int", d % step)) for c, d in digits[1:]]  # fmt: skip
        point = places > 0 and not integer
        if kind == "zero":
            return [(".", ("point", 0, state[1]))] if point else []
        if kind == "int":
            r = state[1]
            return [(c, ("int", (10 * r + d) % step)) for c, d in digits] + [(".", ("point", r, False))] * point
        r, k, zero = (state[1], 0, state[2]) if kind == "point" else state[1:]
        if k == places:
            return []
        return [(c, ("frac", (10 * r + d) % step, k + 1, zero and d == 0)) for c, d in digits]

    def whole(state: tuple) -> bool:  # a multiple; "-0" and "-0.00" are not written
        if state[0] == "zero":
            return not state[1]
        if state[0] == "int":
            return state[1] * 10**places % step == 0
        return state[0] == "frac" and not state[3] and state[1] * 10 ** (places - state[2]) % step == 0

    return _explored(moves, whole)


def _minimal(table: list[dict[str, int]], final: list[bool]) -> Dfa:
    """The DFA `table` (state -> character -> state, 0 the start) minimized (Moore: states split by
    where their characters lead until no class splits), a state per class. Multiples of 1,000 are
    4 classes, not 1,000 remainders."""
    chars: set[str] = set()
    for i, moves in enumerate(table):
        chars.update(moves)
        if not i & 63:
            pause()
    order = sorted(chars)
    cls, classes = [int(f) for f in final], len(set(final))
    while True:
        numbered: dict[tuple, int] = {}  # a state's class and its moves' classes -> its new class
        new = []
        for i, m in enumerate(table):
            key = (cls[i], *(cls[m[c]] if c in m else -1 for c in order))
            new.append(numbered.setdefault(key, len(numbered)))
            if not i & 63:
                pause()
        if len(numbered) == classes:
            break
        cls, classes = new, len(numbered)
    out: list[dict[str, int]] = [{} for _ in numbered]
    finals = [False] * len(numbered)
    for i, moves in enumerate(table):
        out[new[i]] = {c: new[t] for c, t in moves.items()}
        finals[new[i]] = final[i]
        if not i & 63:
            pause()
    return tuple(out), tuple(finals)


def _pattern(dfa: Dfa, source: str) -> Pattern:
    """A DFA as a Pattern: its final states with an empty move to the end, trimmed."""
    table, final = dfa
    raw = Pattern(source)
    raw.moves = []
    for i, moves in enumerate(table):
        raw.moves.append([(ord(c), ord(c), t) for c, t in sorted(moves.items())])
        if not i & 63:
            pause()
    raw.moves.append([])
    raw.empty = [[len(table)] if f else [] for f in final] + [[]]
    raw.accept = len(table)
    return trimmed(raw, {0}, source)


def clear_caches() -> None:
    """Drop the number automata kept here (requests holding one keep theirs)."""
    for cached in (_number, _compared, _multiple):
        cached.cache_clear()
