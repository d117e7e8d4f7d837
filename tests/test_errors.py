"""Errors: the user-facing part of the front end.

A corpus of bad sources lives in tests/golden/errors/: NAME.pat is the input,
NAME.expected the error class and the full message (file:line:column, the
quoted line, the caret, the hint). Regenerate the expected files after a
deliberate change with

    PATTERNCC_UPDATE_GOLDEN=1 pytest tests/test_errors.py

and review the diff. Pathological inputs must give a result or a
PatternError quickly, never a RecursionError, MemoryError or a hang.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from patterncc import ir
from patterncc.errors import (
    ArityError,
    LimitError,
    PatternError,
    PatternSyntaxError,
    PatternValueError,
    RecursiveDefinitionError,
    UnknownNameError,
)
from patterncc.masks import dense_mask
from patterncc.parser import MAX_DEPTH, MAX_SOURCE_CHARS, parse_source
from patterncc.resolve import parse_pattern, resolve
from patterncc.simplify import simplify

GOLDEN = Path(__file__).parent / "golden" / "errors"
CASES = sorted(p.stem for p in GOLDEN.glob("*.pat"))
UPDATE = os.environ.get("PATTERNCC_UPDATE_GOLDEN") == "1"


def _render(err: PatternError) -> str:
    return f"{type(err).__name__}\n{err}\n"


@pytest.mark.parametrize("name", CASES)
def test_error_corpus(name):
    text = (GOLDEN / f"{name}.pat").read_text(encoding="utf-8")
    with pytest.raises(PatternError) as info:
        parse_pattern(text, filename=f"{name}.pat")
    err = info.value
    # Located, 1-based, and the rendered header agrees with the attributes.
    assert err.line is not None and err.line >= 1 and err.column >= 1
    assert str(err).startswith(f"{name}.pat:{err.line}:{err.column}: ")
    expected_file = GOLDEN / f"{name}.expected"
    if UPDATE:
        expected_file.write_text(_render(err), encoding="utf-8")
    assert _render(err) == expected_file.read_text(encoding="utf-8")


def test_every_corpus_case_has_an_expected_file():
    assert len(CASES) >= 50
    orphans = {p.stem for p in GOLDEN.glob("*.expected")} - set(CASES)
    missing = [c for c in CASES if not (GOLDEN / f"{c}.expected").exists()]
    assert not orphans and not missing


def test_caret_sits_under_the_column():
    with pytest.raises(PatternError) as info:
        parse_pattern("pattern p = causal\npattern r = causal & stride(0)", filename="x.pat")
    lines = str(info.value).splitlines()
    assert lines[0] == "x.pat:2:22: stride: `l` must be >= 1, got l=0"
    quoted, caret = lines[1], lines[2]
    assert quoted[caret.index("^"):].startswith("stride(0)")


# -- error classes and positions for a few representative cases

SPOT_CHECKS = [
    ("causal &", PatternSyntaxError, 1, 9, "expected a pattern, found the end of the input"),
    ("local(3", PatternSyntaxError, 1, 8, "expected `)` or `,`"),
    ("causal local(3)", PatternSyntaxError, 1, 8, "expected an operator or the end of the statement"),
    ("stridd(3)", UnknownNameError, 1, 1, "unknown name `stridd`"),
    ("local(1, 2)", ArityError, 1, 10, "`local` takes 1 argument"),
    ("summary(8, 9)", PatternValueError, 1, 1, "1 <= c <= l"),
    ("pattern a = b\npattern b = a", RecursiveDefinitionError, 2, 13, "a -> b -> a"),
    ("local(99999999999)", LimitError, 1, 7, "larger than the limit"),
    ("\n\n   where q % k == 0", PatternValueError, 3, 14, "must not depend on q, k or h"),
]


@pytest.mark.parametrize("text, cls, line, column, message", SPOT_CHECKS)
def test_error_class_and_position(text, cls, line, column, message):
    with pytest.raises(cls, match=re.escape(message)) as info:
        parse_pattern(text)
    assert (info.value.line, info.value.column) == (line, column)


def test_syntax_error_names_what_was_expected_not_terminals():
    with pytest.raises(PatternSyntaxError) as info:
        parse_pattern("heads { 0..8 causal }")
    message = info.value.message
    assert "`=>`" in message and "ARROW" not in message and "__ANON" not in message


def test_unclosed_bracket_hint_points_at_the_bracket():
    with pytest.raises(PatternSyntaxError) as info:
        parse_pattern("causal & (local(3)\n  | stride(4)\n")
    assert info.value.hint == "the `(` on line 1, column 10 is not closed"


# -- overrides and entry (no text to point at for some of these)


def test_unknown_override_lists_the_parameters():
    with pytest.raises(UnknownNameError, match=r"`strided` has no parameter `w`; its parameters: l"):
        parse_pattern("pattern strided(l = 128) = causal & (local(l) | stride(l))", overrides={"w": 3})


def test_override_must_be_an_integer():
    with pytest.raises(PatternValueError, match="not an integer"):
        parse_pattern("pattern p(w = 3) = local(w)", overrides={"w": "3"})
    with pytest.raises(PatternValueError, match="not an integer"):
        parse_pattern("pattern p(w = 3) = local(w)", overrides={"w": True})


def test_override_out_of_range_is_reported_at_the_primitive():
    with pytest.raises(PatternValueError, match="`w` must be >= 1, got w=0") as info:
        parse_pattern("pattern p(w = 3) =\n  causal & local(w)", overrides={"w": 0})
    assert (info.value.line, info.value.column) == (2, 12)


def test_override_too_large():
    with pytest.raises(LimitError):
        parse_pattern("pattern p(w = 3) = local(w)", overrides={"w": 2**40})


def test_overrides_need_a_definition():
    with pytest.raises(UnknownNameError, match="ends with an expression"):
        parse_pattern("causal", overrides={"w": 3})


def test_unknown_entry_suggests_names():
    with pytest.raises(UnknownNameError, match="no pattern named `strided2`") as info:
        parse_pattern("pattern span = causal", entry="strided2")
    assert "`strided`" in info.value.hint


def test_non_string_source_is_a_type_error():
    with pytest.raises(TypeError):
        parse_source(b"causal")


# -- pathological inputs

PATHOLOGICAL = {
    "5000 nested parentheses": ("(" * 5000 + "causal" + ")" * 5000, None),
    "5000 nested parentheses in where": ("where " + "(" * 5000 + "q" + ")" * 5000 + " < k", None),
    "5000 unclosed parentheses": ("(" * 5000, PatternSyntaxError),
    "3000 chained |": (" | ".join(f"local({i + 1})" for i in range(3000)), None),
    "3000 chained &": (" & ".join(["causal"] * 3000), None),
    "3000 chained and": ("where " + " and ".join(f"q != {i}" for i in range(3000)), None),
    "3000 chained -": (" - ".join(["causal"] * 3000), LimitError),
    "3000 chained +": ("where q < " + " + ".join(["1"] * 3000), LimitError),
    "5000 tildes": ("~" * 5000 + "causal", LimitError),
    "5000 unary minus": ("where q < " + "-" * 5000 + "1", LimitError),
    "5000 nots": ("where " + "not " * 5000 + "q < k", LimitError),
    "deep cycle": ("cycle(" * 1000 + "causal" + ")" * 1000, LimitError),
    "deep where calls": ("where " + "abs(" * 1000 + "q" + ")" * 1000 + " < k", LimitError),
    "40-digit number": ("local(" + "9" * 40 + ")", LimitError),
    "5000-digit number": ("local(" + "9" * 5000 + ")", LimitError),
    "NUL byte": ("causal\0", PatternSyntaxError),
    "only NUL bytes": ("\0" * 1000, PatternSyntaxError),
    "1 MB file": ("# " + "x" * (1 << 20) + "\ncausal", LimitError),
    "1 MB of unions": ("causal | " * (1 << 17) + "causal", LimitError),
    "just under the size limit": ("# " + "x" * (MAX_SOURCE_CHARS - 100) + "\ncausal", None),
    "exponential inlining": ("".join(f"pattern d{i} = d{i + 1} | d{i + 1}\n" for i in range(60)) + "pattern d60 = causal\nd0", LimitError),
    "exponential expression": ("".join(f"pattern d{i}(x) = d{i + 1}(x * x)\n" for i in range(60)) + "pattern d60(x) = local(x)\nd0(n)", LimitError),
    "exponential constant": ("".join(f"pattern d{i}(x) = d{i + 1}(x * x)\n" for i in range(60)) + "pattern d60(x) = local(x)\nd0(3)", LimitError),
    "1000 chained definitions": ("".join(f"pattern d{i} = d{i + 1}\n" for i in range(1000)) + "pattern d1000 = causal\nd0", LimitError),
    "2000-definition cycle": ("".join(f"pattern d{i} = d{(i + 1) % 2000}\n" for i in range(2000)) + "d0", RecursiveDefinitionError),
    "2000 heads": ("heads {" + ", ".join(f"{i}..{i + 1} => local({i + 1})" for i in range(2000)) + "}", None),
    "long line error": ("causal | " * 5000 + "stride(0)", PatternValueError),
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_input(name):
    text, expected = PATHOLOGICAL[name]
    start = time.perf_counter()
    try:
        p = parse_pattern(text)
        str(p), hash(p), p == p  # printing, hashing and comparing must not recurse too deep
        dense_mask(p, 8, heads=2000 if name == "2000 heads" else 1)
        outcome = None
    except PatternError as err:
        outcome = type(err)
        assert err.line is not None, name
        assert len(str(err)) < 2000  # long lines are cut around the column
    assert outcome is expected
    assert time.perf_counter() - start < 5.0


def test_nesting_just_inside_the_limit_works_end_to_end():
    depth = MAX_DEPTH - 10
    for text in (
        "~" * depth + "causal",
        " - ".join(["local(3)"] * depth),
        "cycle(" * (depth - 1) + "local(3), causal" + ")" * (depth - 1),
        "where " + "abs(" * (depth - 5) + "q - k" + ")" * (depth - 5) + " < 3",
    ):
        p = parse_pattern(text)
        assert parse_pattern(str(p)) == p
        dense_mask(p, 8, heads=2)


def test_simplify_refuses_a_python_built_pattern_that_is_too_deep():
    p = ir.Causal()
    for _ in range(MAX_DEPTH + 5):
        p = p - ir.Local(2)
    with pytest.raises(LimitError, match="nested too deeply"):
        simplify(p)


def test_simplify_handles_shared_subtrees_without_blowup():
    p = ir.Causal() - ir.Local(2)
    for _ in range(60):  # 2**60 nodes as a tree, 120 as a DAG
        p = ir.Difference(p, ~p)
    start = time.perf_counter()
    try:
        simplify(p)
    except LimitError:
        pass
    assert time.perf_counter() - start < 5.0


def test_resolve_rejects_what_the_parser_cannot_produce():
    # A hand-made module deeper than the parser allows still gets a LimitError.
    from patterncc import ast

    node = ast.Name("causal")
    for _ in range(MAX_DEPTH + 5):
        node = ast.Unary("~", node)
    with pytest.raises(LimitError):
        resolve(ast.Module((), node))
