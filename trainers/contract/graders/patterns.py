"""User regular expressions, bounded before they cost anything (torch-free).

A ``regex`` grader's ``pattern`` and a ``pattern_table`` judge's class patterns are
user input that ends up compiled. Compiling is where a pattern can explode:
``(((a{50}){50}){50}){50}`` expands to 6.25 million copies (seconds of CPU, gigabytes),
``a{4294967294}`` asks for more memory than the machine has. Two gates:

1. ``check_shape`` (every parse of a spec, in any process): at most
   ``MAX_PATTERN_CHARS`` characters, no counted repeat over ``MAX_REPEAT``, groups
   nested at most ``MAX_NESTING`` deep, and at most ``MAX_EXPANSION`` atoms once
   counted repeats are multiplied out (an estimate of the compiled size that never
   underestimates what nesting does). Pure string scanning, linear in the length.
2. ``check_compiles`` (the API, before it accepts a spec or a grader): the patterns
   that pass the shape check are compiled in a child process capped at
   ``COMPILE_MEMORY_BYTES`` and ``COMPILE_TIMEOUT_S`` (``trainers.contract.isolation``),
   so a pattern the estimate misjudges still costs the API nothing.

The training process compiles a pattern only after the API accepted it, and searches
with the ``regex`` module's timeout (``text.regex_match``).
"""

from __future__ import annotations

import re
from typing import Any

from trainers.contract.isolation import run_bounded

MAX_PATTERN_CHARS = 1000
MAX_REPEAT = 1000
MAX_NESTING = 20
MAX_EXPANSION = 20_000
COMPILE_TIMEOUT_S = 2.0
COMPILE_MEMORY_BYTES = 256 << 20

_COUNTED = re.compile(r"\{(\d*)(,?)(\d*)\}")
_BRACED_ESCAPES = "pPNx"  # \p{L}, \N{name}, \x{263a}: braces that are no repeat


class PatternError(ValueError):
    """A pattern refused by a gate; the message says which limit. ``param`` is the field
    path of the pattern (``check_compiles``), when known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _class_end(p: str, i: int) -> int:
    """The index after the character class that opens at ``p[i] == '['``."""
    j = i + 1
    if j < len(p) and p[j] == "^":
        j += 1
    if j < len(p) and p[j] == "]":
        j += 1  # a leading ']' is a literal
    depth = 1
    while j < len(p) and depth:
        if p[j] == "\\":
            j += 2
            continue
        if p[j] == "[":
            depth += 1
        elif p[j] == "]":
            depth -= 1
        j += 1
    return j


def _group_body(p: str, j: int) -> int:
    """The index where a group's content starts, past its ``?`` prefix: ``?:``, ``?=``,
    ``?!``, ``?>``, ``?|``, ``?<=``, ``?<!``, ``?P<name>``, ``?<name>`` or inline flags."""
    if not p.startswith("?", j):
        return j
    j += 1
    if p.startswith(("<=", "<!"), j):
        return j + 2
    if p.startswith(("=", "!", ">", "|"), j):
        return j + 1
    if p.startswith("P<", j) or p.startswith("<", j):
        close = p.find(">", j)
        return len(p) if close < 0 else close + 1
    while j < len(p) and (p[j].isalpha() or p[j] == "-"):
        j += 1  # inline flags, (?i) or (?i:...)
    return j + 1 if p.startswith(":", j) else j


def expansion(pattern: str) -> int:
    """Atoms in ``pattern`` with counted repeats multiplied out (``a{3}`` is 3,
    ``(ab){2}{3}``... each quantifier multiplies the atom or group before it); raises
    PatternError for a count over ``MAX_REPEAT`` or nesting past ``MAX_NESTING``."""
    stack: list[list[int]] = [[]]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            j = i + 2
            if i + 1 < n and pattern[i + 1] in _BRACED_ESCAPES and j < n and pattern[j] == "{":
                close = pattern.find("}", j)
                j = n if close < 0 else close + 1
            stack[-1].append(1)
            i = j
        elif c == "[":
            stack[-1].append(1)
            i = _class_end(pattern, i)
        elif c == "(":
            if len(stack) > MAX_NESTING:
                raise PatternError(f"groups are nested more than {MAX_NESTING} deep")
            stack.append([])
            i = _group_body(pattern, i + 1)
        elif c == ")":
            if len(stack) > 1:
                inner = max(1, sum(stack.pop()))
                stack[-1].append(inner)
            i += 1
        elif c == "{" and (m := _COUNTED.match(pattern, i)) and (m.group(1) or m.group(3)):
            low = int(m.group(1) or 0)
            high = int(m.group(3)) if m.group(3) else None
            biggest = max(low, high or 0)
            if biggest > MAX_REPEAT:
                raise PatternError(
                    f"the counted repeat {m.group(0)} is over {MAX_REPEAT}; use a smaller "
                    "count or an unbounded repeat (*, +)"
                )
            count = high if high is not None and m.group(2) else low
            if stack[-1]:
                stack[-1][-1] *= max(1, count)
            i = m.end()
        else:
            if c not in "*+?|^$":
                stack[-1].append(1)
            i += 1
    return sum(sum(level) for level in stack)


def check_shape(pattern: str) -> str:
    """``pattern`` if it passes the static limits; PatternError naming the limit."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"the pattern is {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    size = expansion(pattern)
    if size > MAX_EXPANSION:
        raise PatternError(
            f"the pattern's repeats multiply out to {size} atoms, over {MAX_EXPANSION} "
            "(nested counted repeats multiply); simplify it"
        )
    return pattern


def compile_errors(patterns: list[str]) -> list[str | None]:
    """Compile each pattern (``regex`` module); its error message, or None. Runs in the
    bounded child of ``check_compiles``."""
    import regex

    out: list[str | None] = []
    for pattern in patterns:
        try:
            regex.compile(pattern)
            out.append(None)
        except regex.error as exc:
            out.append(f"the pattern does not compile: {exc}")
    return out


def check_compiles(found: list[tuple[str, str]]) -> None:
    """Compile every (where, pattern) in one bounded child; PatternError naming the first
    that fails (``where: message``) or the limit the batch ran into."""
    if not found:
        return
    result = run_bounded(
        compile_errors,
        ([p for _, p in found],),
        timeout_s=COMPILE_TIMEOUT_S,
        memory_bytes=COMPILE_MEMORY_BYTES,
        preload=["regex", "trainers.contract.graders.patterns"],
    )
    if result.kind == "ok":
        for (place, _), error in zip(found, result.value, strict=True):
            if error:
                raise PatternError(f"{place}: {error}", place)
        return
    if len(found) > 1:  # which one? each alone (rare: only a batch that blew a limit)
        for item in found:
            check_compiles([item])
    place = found[0][0]
    why = {
        "timeout": f"compiling it took longer than {COMPILE_TIMEOUT_S:g} s",
        "memory": f"compiling it needs more than {COMPILE_MEMORY_BYTES >> 20} MiB",
    }.get(result.kind, "compiling it failed")
    raise PatternError(f"{place}: {why}; simplify the pattern", place)


def patterns_in(value: Any, path: str = "") -> list[tuple[str, str]]:
    """Every user regex in a grader, judge or spec (as JSON): ``pattern`` of each object
    whose ``type`` is ``regex``, and of each class of a ``pattern_table`` judge, with the
    field path it was found at."""
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        kind = value.get("type")
        if kind == "regex" and isinstance(value.get("pattern"), str):
            found.append((_join(path, "pattern"), value["pattern"]))
        if kind == "pattern_table" and isinstance(value.get("classes"), list):
            for i, cls in enumerate(value["classes"]):
                if isinstance(cls, dict) and isinstance(cls.get("pattern"), str):
                    found.append((f"{_join(path, 'classes')}[{i}].pattern", cls["pattern"]))
        for key, item in value.items():
            if isinstance(item, dict | list):
                found += patterns_in(item, _join(path, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += patterns_in(item, f"{path}[{i}]")
    return found


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
