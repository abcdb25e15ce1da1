"""User regexes are bounded before they cost anything (issue 19, item 2): the static
shape check every parse runs, and the compile in a capped child the API runs."""

from __future__ import annotations

import pytest

from trainers.contract.graders import patterns
from trainers.contract.graders.patterns import (
    PatternError,
    check_compiles,
    check_shape,
    expansion,
    patterns_in,
)
from trainers.contract.isolation import run_bounded

# The probe's bombs: 7.6 s and 1.8 GB in the API for the first, past 11 GB for the second.
BOMBS = [
    ("(((a{50}){50}){50}){50}", "multiply out to 6250000 atoms, over 20000"),
    ("a{4294967294}", "counted repeat {4294967294} is over 1000"),
    ("(" * 21 + "a" + ")" * 21, "nested more than 20 deep"),
    ("a" * 1001, "1001 characters; at most 1000"),
    ("(?:(?:x{1000}){1000})", "multiply out to 1000000 atoms"),
]


@pytest.mark.parametrize(("pattern", "words"), BOMBS)
def test_the_shape_check_refuses_each_bomb_naming_the_limit(pattern, words):
    with pytest.raises(PatternError, match=words.replace("{", r"\{").replace("(", r"\(")):
        check_shape(pattern)


@pytest.mark.parametrize(
    ("pattern", "size"),
    [
        (r"(?i)^answer: \d+$", 10),
        (r"\p{L}{2,5}", 5),  # \p{...} braces are no repeat
        (r"\x{263a}{3}", 3),
        (r"\{1000000\}", 9),  # escaped braces are literals
        ("[{5000}]", 1),  # a class is one atom, braces in it are literals
        ("(ab){10}", 20),
        ("(a{10}){,3}", 30),
        ("a{2,}", 2),  # an open repeat costs its minimum (then it loops)
        ("x{", 2),  # an unfinished brace is a literal
        ("(?P<word>ab)(?:cd){2}(?=e)(?i:f)", 8),  # group prefixes are no atoms
    ],
)
def test_ordinary_patterns_pass_and_are_sized_as_they_expand(pattern, size):
    assert check_shape(pattern) == pattern
    assert expansion(pattern) == size


def test_a_pattern_that_passes_the_shape_check_is_compiled_in_a_capped_child(monkeypatch):
    found = [("grader.pattern", "(a{1000}){20}")]  # 20 000 atoms: at the shape limit
    check_compiles(found)  # fine under the real cap
    monkeypatch.setattr(patterns, "COMPILE_MEMORY_BYTES", 1 << 20)
    with pytest.raises(PatternError, match=r"grader\.pattern: compiling it needs more than 1 MiB"):
        check_compiles(found)
    monkeypatch.setattr(patterns, "COMPILE_MEMORY_BYTES", 256 << 20)
    monkeypatch.setattr(patterns, "COMPILE_TIMEOUT_S", 0.0)
    with pytest.raises(PatternError, match="compiling it took longer than 0 s") as err:
        check_compiles(found)
    assert err.value.param == "grader.pattern"


def test_a_syntax_error_names_the_pattern_that_has_it():
    found = [("a.pattern", "ok+"), ("b.classes[1].pattern", "(unclosed")]
    with pytest.raises(PatternError, match=r"b\.classes\[1\]\.pattern: the pattern does not"):
        check_compiles(found)


def test_patterns_are_found_wherever_a_spec_nests_them():
    method = {
        "type": "grpo",
        "grpo": {
            "graders": [
                {"type": "regex", "name": "r", "input": "x", "pattern": "p1"},
                {
                    "type": "multi",
                    "graders": {"inner": {"type": "regex", "pattern": "p2"}},
                },
            ],
        },
    }
    judge = {"type": "pattern_table", "classes": [{"name": "a", "pattern": "p3"}]}
    assert patterns_in(method, "method") == [
        ("method.grpo.graders[0].pattern", "p1"),
        ("method.grpo.graders[1].graders.inner.pattern", "p2"),
    ]
    assert patterns_in({"judge": judge}) == [("judge.classes[0].pattern", "p3")]


# --- the bounded child itself ---------------------------------------------------------


def _allocate(megabytes: int) -> int:
    return len(bytearray(megabytes << 20))


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _raise() -> None:
    raise KeyError("nope")


def _exit() -> None:
    import os

    os._exit(7)


def test_run_bounded_reports_each_way_a_child_can_end():
    assert run_bounded(_allocate, (8,), timeout_s=30, memory_bytes=64 << 20).value == 8 << 20
    assert run_bounded(_allocate, (512,), timeout_s=30, memory_bytes=64 << 20).kind == "memory"
    assert run_bounded(_sleep, (30,), timeout_s=0.2, memory_bytes=None).kind == "timeout"
    error = run_bounded(_raise, (), timeout_s=30, memory_bytes=None)
    assert (error.kind, error.detail) == ("error", "KeyError: 'nope'")
    died = run_bounded(_exit, (), timeout_s=30, memory_bytes=None)
    assert (died.kind, died.detail) == ("died", "exit code 7")
