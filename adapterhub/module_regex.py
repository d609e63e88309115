"""PEFT module selectors given as regexes (`target_modules`, `exclude_modules`, `rank_pattern` keys),
matched in time linear in the module name, whatever the pattern.

PEFT selects a module with ``re.fullmatch(pattern, name)`` (peft 0.21.2 ``check_target_module_exists``).
Python's backtracking engine takes exponential time on patterns such as ``(a+)+$``: one crafted config
took 79 s per module. So the pattern is parsed by Python's own parser (exactly Python's syntax and flags)
and run as a Thompson NFA (Russ Cox, "Regular Expression Matching Can Be Simple And Fast", 2007): one
pass over the name keeping the set of live pattern positions, O(len(name) * len(pattern)) steps. Each
single character, anchor and word boundary is still tested by Python's engine at one position, so
character classes, case folding, ``\\b`` and ``$`` behave exactly as in ``re.fullmatch``. Lookarounds
run as NFAs too. Backreferences, conditionals, atomic groups and possessive repeats have no NFA form
and are refused (ConfigError); module selectors never need them.
"""

from __future__ import annotations

import functools
import re
from typing import Callable

from adapterhub.errors import AdapterFormatError, ConfigError

try:  # the stdlib regex parser and compiler; private, but the only exact source of Python's syntax
    from re import _compiler as sre_compile, _constants as sre_constants, _parser as sre_parse  # Python >= 3.11
except ImportError:  # Python 3.10
    import sre_compile
    import sre_constants
    import sre_parse

MAX_PATTERN = 1000  # characters; PEFT selectors are a few dozen
MAX_PROGRAM = 5000  # NFA instructions, after expanding counted repeats such as a{3,8}
MAX_NAME = 1024  # characters of a module name; real Hugging Face module paths are under 200

_C = sre_constants
_ONE_CHAR = (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN)
_REPEATS = (_C.MAX_REPEAT, _C.MIN_REPEAT)  # lazy or greedy: the same set of matches
_CHAR, _AT, _SPLIT, _JMP, _LOOK, _MATCH = range(6)


class ModuleRegex:
    """`ModuleRegex(pattern, "target_modules").fullmatch(name)` == `re.fullmatch(pattern, name) is not None`."""

    def __init__(self, pattern: str, field: str):
        self.pattern, self.field = pattern, field
        if len(pattern) > MAX_PATTERN:
            raise ConfigError(f"{field} is a {len(pattern)}-character regex; at most {MAX_PATTERN} are allowed, "
                              "list the module names instead")
        try:
            re.compile(pattern)
            parsed = sre_parse.parse(pattern)
        except (re.error, RecursionError, OverflowError) as error:
            raise ConfigError(f"{field} {pattern!r} is not a valid regular expression: {error}") from None
        self._state = parsed.state
        self._program = self._compile(parsed)

    def fullmatch(self, name: str) -> bool:
        if len(name) > MAX_NAME:
            raise AdapterFormatError(f"module name {name[:60]!r}... is {len(name)} characters long; module paths are "
                                     f"at most {MAX_NAME}, the adapter's tensor keys are corrupt")
        return len(name) in _ends(self._program, name, 0, len(name), {}, first=False)

    # --- pattern → NFA program: a list of (opcode, operands...) ending in _MATCH ---

    def _compile(self, nodes) -> list[tuple]:
        program: list[tuple] = []
        self._emit(nodes, (), program)
        program.append((_MATCH,))
        return program

    def _emit(self, nodes, flags: tuple, program: list) -> None:
        """Append the instructions of `nodes`; `flags` is the chain of (add, delete) scoped flags around them."""
        for op, av in nodes:
            if len(program) > MAX_PROGRAM:
                raise ConfigError(f"{self.field} {self.pattern!r} expands to over {MAX_PROGRAM} steps (large "
                                  "counted repeats such as a{1000}); simplify it or list the module names")
            if op in _ONE_CHAR:
                program.append((_CHAR, self._python_match((op, av), flags)))
            elif op is _C.AT:
                program.append((_AT, self._python_match((op, av), flags)))
            elif op is _C.SUBPATTERN:
                self._emit(av[3], flags + ((av[1], av[2]),), program)
            elif op is _C.BRANCH:
                self._branch(av[1], flags, program)
            elif op in _REPEATS:
                self._repeat(*av, flags, program)
            elif op in (_C.ASSERT, _C.ASSERT_NOT):
                self._lookaround(op, *av, flags, program)
            else:  # GROUPREF, GROUPREF_EXISTS, ATOMIC_GROUP, POSSESSIVE_REPEAT
                raise ConfigError(f"{self.field} {self.pattern!r} uses {str(op).lower()} (a backreference, "
                                  "conditional, atomic group or possessive repeat), which module selectors do not "
                                  "support; write it with plain groups, classes, '|' and repeats")

    def _branch(self, alternatives, flags: tuple, program: list) -> None:
        jumps = []
        for alternative in alternatives[:-1]:
            split = len(program)
            program.append(None)
            self._emit(alternative, flags, program)
            jumps.append(len(program))
            program.append(None)
            program[split] = (_SPLIT, split + 1, len(program))
        self._emit(alternatives[-1], flags, program)
        for jump in jumps:
            program[jump] = (_JMP, len(program))

    def _repeat(self, low: int, high: int, body, flags: tuple, program: list) -> None:
        for _ in range(low):
            self._emit(body, flags, program)
        if high == _C.MAXREPEAT:
            loop = len(program)
            program.append(None)
            self._emit(body, flags, program)
            program.append((_JMP, loop))
            program[loop] = (_SPLIT, loop + 1, len(program))
            return
        skips = []
        for _ in range(high - low):
            skips.append(len(program))
            program.append(None)
            self._emit(body, flags, program)
        for skip in skips:
            program[skip] = (_SPLIT, skip + 1, len(program))

    def _lookaround(self, op, direction: int, body, flags: tuple, program: list) -> None:
        low, high = body.getwidth()
        if direction < 0 and low != high:
            raise ConfigError(f"{self.field} {self.pattern!r}: a look-behind must have a fixed width")
        inner: list[tuple] = []
        self._emit(body, flags, inner)
        inner.append((_MATCH,))
        program.append((_LOOK, inner, direction, op is _C.ASSERT, low))

    def _python_match(self, node, flags: tuple) -> Callable:
        """`match(text, i)` of one zero- or one-character node, compiled by Python with the flags in scope."""
        pattern = sre_parse.SubPattern(self._state, [node])
        for add, delete in reversed(flags):
            pattern = sre_parse.SubPattern(self._state, [(_C.SUBPATTERN, (None, add, delete, pattern))])
        return sre_compile.compile(pattern).match


@functools.lru_cache(maxsize=512)
def module_regex(pattern: str, field: str) -> ModuleRegex:
    """The compiled selector, cached: one config's patterns are matched against every module of a model."""
    return ModuleRegex(pattern, field)


def check_layers_pattern(pattern: str, field: str = "layers_pattern") -> str:
    """A `layers_pattern` names the container of the layer index ("layers", "h", "blocks|layers"). It runs
    inside a larger backtracking regex that captures the index, so it may hold no repeat and at most one
    '|' group: a match then costs O(len(name) * len(pattern)) whatever the name."""
    module_regex(pattern, field)  # valid, and no construct without an NFA form
    nodes, branches = list(sre_parse.parse(pattern)), 0
    while nodes:
        op, av = nodes.pop()
        if op in _REPEATS:
            raise ConfigError(f"{field} {pattern!r} has a repeat ('*', '+', '?' or '{{m,n}}'); it names the layer "
                              "container, e.g. 'layers' or 'h'")
        branches += op is _C.BRANCH
        nodes += [item for sub in _children(op, av) for item in sub]
    if branches > 1:
        raise ConfigError(f"{field} {pattern!r} has more than one '|' group; write one list of alternatives, "
                          "e.g. 'layers|h'")
    return pattern


def _children(op, av) -> list:
    """The sub-patterns of one parsed node (sre_parse's node layouts)."""
    if op is _C.SUBPATTERN:
        return [av[3]]
    if op is _C.BRANCH:
        return list(av[1])
    if op in (_C.ASSERT, _C.ASSERT_NOT):
        return [av[1]]
    return []


def _ends(program: list, text: str, start: int, stop: int, memo: dict, first: bool) -> set[int]:
    """The positions e in [start, stop] at which `program` matches text[start:e] (anchors and lookarounds
    see the whole text); with `first`, stop at the first one found."""
    ends: set[int] = set()
    live = _closure(program, {0}, text, start, memo)
    for i in range(start, stop + 1):
        if len(program) - 1 in live:
            ends.add(i)
            if first:
                break
        if i == stop or not live:
            break
        live = _closure(program, {pc + 1 for pc in live if program[pc][0] == _CHAR and program[pc][1](text, i)},
                        text, i + 1, memo)
    return ends


def _closure(program: list, pcs: set[int], text: str, i: int, memo: dict) -> set[int]:
    """The character and match instructions reachable from `pcs` at position `i` without reading a character."""
    out, seen, stack = set(), set(), list(pcs)
    while stack:
        pc = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        op = program[pc]
        if op[0] in (_CHAR, _MATCH):
            out.add(pc)
        elif op[0] == _SPLIT:
            stack += [op[1], op[2]]
        elif op[0] == _JMP:
            stack.append(op[1])
        elif (op[1](text, i) is not None) if op[0] == _AT else _look(op, text, i, memo):
            stack.append(pc + 1)
    return out


def _look(op: tuple, text: str, i: int, memo: dict) -> bool:
    """Whether a lookaround holds at position `i` (memoized per match, so each runs once per position)."""
    _, inner, direction, positive, width = op
    key = (id(inner), i)
    if key not in memo:
        if direction > 0:
            memo[key] = bool(_ends(inner, text, i, len(text), memo, first=True))
        else:
            memo[key] = i >= width and i in _ends(inner, text, i - width, i, memo, first=False)
    return memo[key] == positive
