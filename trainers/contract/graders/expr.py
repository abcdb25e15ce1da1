"""The arithmetic of a multi grader's ``calculate_output``: a tiny parser, never ``eval``.

OpenAI's multigrader combines named sub-grader scores with a formula such as
``"0.7 * correct + 0.3 * min(1, fluency)"``. This module accepts exactly:

* numbers (``2``, ``0.5``, ``.5``, ``1e-3``) and names (the sub-graders' keys);
* ``+ - * /``, unary ``+``/``-``, parentheses, and powers written ``^`` or ``**``
  (right-associative and binding tighter than unary minus: ``-2^2 == -4``);
* the functions ``min``, ``max`` (one or more arguments), ``abs``, ``floor``,
  ``ceil``, ``exp``, ``sqrt`` and ``log`` (natural; one argument).

Everything else (attribute access, indexing, strings, comparisons, other calls,
unknown names) is a ``FormulaError`` at parse time, so a bad formula is refused
when the grader is validated. Evaluation is in floats: an overflow (``9^9^9``),
a division by zero, a domain error (``sqrt(-1)``) or a non-finite result is a
``FormulaError`` too, never a hang or a huge integer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from trainers.contract.graders.templates import GraderError

__all__ = ["FUNCTIONS", "Formula", "FormulaError", "compile_formula"]

MAX_LENGTH = 1000  # characters in a formula
MAX_DEPTH = 40  # nesting of parentheses, calls and unary signs

FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {
    # name -> (implementation, arity; None = one or more)
    "min": (min, None),
    "max": (max, None),
    "abs": (abs, 1),
    "floor": (lambda x: float(math.floor(x)), 1),
    "ceil": (lambda x: float(math.ceil(x)), 1),
    "exp": (math.exp, 1),
    "sqrt": (math.sqrt, 1),
    "log": (math.log, 1),
}

_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>\*\*|[-+*/^(),]))"
)


class FormulaError(GraderError):
    """A formula that does not parse, or whose value is not a finite number."""

    flag = "formula_parse_error"
    soft = True  # at evaluation time it depends on the sub-scores, i.e. on the sample


# A parsed formula is a tree of tuples: ("num", v) | ("var", name) | ("neg", x)
# | ("bin", op, a, b) | ("call", name, args).
Node = tuple


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos, stripped = [], 0, text.rstrip()
    while pos < len(stripped):
        m = _TOKEN.match(stripped, pos)
        if m is None or m.end() == pos:
            raise FormulaError(f"unexpected {stripped[pos:].lstrip()[:1]!r} at position {pos}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return [*out, ("end", "")]


class _Parser:
    """Recursive descent over the grammar in the module docstring."""

    def __init__(self, text: str):
        self.toks, self.i, self.depth = _tokens(text), 0, 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i]

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.toks[self.i]
        if value is not None and tok[1] != value:
            got = tok[1] or "end of formula"
            raise FormulaError(f"expected {value!r} but found {got!r}")
        self.i += 1
        return tok

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FormulaError(f"formula nests deeper than {MAX_DEPTH} levels")

    def expr(self) -> Node:
        node = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            node = ("bin", op, node, self.term())
        return node

    def term(self) -> Node:
        node = self.unary()
        while self.peek()[1] in ("*", "/"):
            op = self.take()[1]
            node = ("bin", op, node, self.unary())
        return node

    def unary(self) -> Node:
        if self.peek()[1] in ("+", "-"):
            self.nest()
            op = self.take()[1]
            inner = self.unary()
            self.depth -= 1
            return ("neg", inner) if op == "-" else inner
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.peek()[1] in ("^", "**"):
            self.take()
            self.nest()
            exponent = self.unary()
            self.depth -= 1
            return ("bin", "^", base, exponent)
        return base

    def atom(self) -> Node:
        kind, value = self.take()
        if kind == "num":
            return ("num", float(value))
        if kind == "name":
            return self.call(value) if self.peek()[1] == "(" else ("var", value)
        if value == "(":
            self.nest()
            node = self.expr()
            self.take(")")
            self.depth -= 1
            return node
        raise FormulaError(f"unexpected {value or 'end of formula'!r}")

    def call(self, name: str) -> Node:
        if name not in FUNCTIONS:
            raise FormulaError(f"unknown function {name!r}; allowed: {', '.join(FUNCTIONS)}")
        self.take("(")
        self.nest()
        args = [self.expr()]
        while self.peek()[1] == ",":
            self.take()
            args.append(self.expr())
        self.take(")")
        self.depth -= 1
        arity = FUNCTIONS[name][1]
        if arity is not None and len(args) != arity:
            raise FormulaError(f"{name}() takes {arity} argument(s), got {len(args)}")
        return ("call", name, args)


def _names(node: Node) -> set[str]:
    if node[0] == "var":
        return {node[1]}
    if node[0] == "neg":
        return _names(node[1])
    if node[0] == "bin":
        return _names(node[2]) | _names(node[3])
    if node[0] == "call":
        return set().union(*(_names(a) for a in node[2]))
    return set()


def _binary(op: str, a: float, b: float) -> float:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return a / b
    return math.pow(a, b)


def _eval(node: Node, env: Mapping[str, float]) -> float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        return float(env[node[1]])
    if kind == "neg":
        return -_eval(node[1], env)
    if kind == "bin":
        return _binary(node[1], _eval(node[2], env), _eval(node[3], env))
    return float(FUNCTIONS[node[1]][0](*(_eval(a, env) for a in node[2])))


@dataclass(frozen=True)
class Formula:
    """A parsed formula: ``names`` it reads, and ``evaluate(env)`` for a float."""

    text: str
    tree: Node
    names: frozenset[str]

    def evaluate(self, env: Mapping[str, float]) -> float:
        missing = sorted(self.names - set(env))
        if missing:
            raise FormulaError(f"formula reads undefined name(s): {', '.join(missing)}")
        try:
            value = _eval(self.tree, env)
        except ZeroDivisionError:
            raise FormulaError(f"'{self.text}' divides by zero") from None
        except (OverflowError, ValueError) as exc:
            raise FormulaError(f"'{self.text}' has no finite value: {exc}") from None
        if not math.isfinite(value):
            raise FormulaError(f"'{self.text}' evaluated to {value}")
        return value


def compile_formula(text: str, allowed: set[str] | frozenset[str] | None = None) -> Formula:
    """Parse ``text``; with ``allowed``, every name it reads must be in that set."""
    if len(text) > MAX_LENGTH:
        raise FormulaError(f"formula is longer than {MAX_LENGTH} characters")
    parser = _Parser(text)
    tree = parser.expr()
    if parser.peek()[0] != "end":
        raise FormulaError(f"unexpected {parser.peek()[1]!r} after a complete expression")
    names = frozenset(_names(tree))
    if allowed is not None and names - set(allowed):
        unknown = ", ".join(sorted(names - set(allowed)))
        known = ", ".join(sorted(allowed)) or "(none)"
        raise FormulaError(f"formula reads {unknown}, which is not a sub-grader; defined: {known}")
    return Formula(text, tree, names)
