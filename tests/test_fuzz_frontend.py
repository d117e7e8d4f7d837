"""Fuzzing the front end: whatever the text, only PatternError escapes.

Three hypothesis tests feed parse -> resolve -> simplify -> bind -> dense
mask (n = 1, 7 and 16, 2 heads):

- random characters from the language's alphabet and some others (500 examples);
- random sequences of the language's tokens, which get much further into
  the grammar than characters do (1000 examples);
- valid programs mutated by deleting, inserting, swapping and duplicating
  characters and tokens (1000 examples; about 40% still resolve).

Every pattern that does come out must also print and parse back to itself.
Together they run in under 10 seconds.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from patterncc.errors import PatternError
from patterncc.masks import dense_mask
from patterncc.resolve import parse_pattern

HEADS = 2

ALPHABET = "abcdefghiklmnopqrstuvwxyz_0123456789 \t\n;,()[]{}|&-~+*/%<>=!.#\"'\\\0\x7fé"

TOKENS = [
    "causal", "all", "none", "local", "stride", "block", "summary", "global", "sink",
    "dilated", "random", "where", "heads", "cycle", "pattern", "and", "or", "not",
    "q", "k", "h", "n", "isqrt", "abs", "min", "max", "strided", "fixed", "bigbird",
    "axial", "sliding_window", "p", "w", "l", "x",
    "(", ")", "{", "}", ",", "|", "&", "-", "~", "+", "*", "//", "%", "<", "<=", "==",
    "!=", ">", ">=", "=", "=>", "..", ";", "\n", "0", "1", "2", "3", "8", "16",
    "2147483647", "99999999999", "# c\n",
    "with", "softcap", "alibi", "30.5", "0.0",
]

PROGRAMS = [
    "causal & (local(4) | stride(4))",
    "pattern p(w = 3, g = 1) = causal & (local(w) | global(g))\np(2)",
    "pattern a(x = 2) = b(x) | sink(1)\npattern b(y) = dilated(y, 2)\na",
    "where q - k < 3 and not k % 2 == 0 or h == 1",
    "causal & (where 0 <= q - k < 4)",
    "heads { 0..1 => strided(2), 1..2 => fixed(4, 1) }",
    "cycle(sliding_window(3), longformer(2, 1), bigbird(2, 1, 1, 4, 3))",
    "pattern s() = strided(isqrt(n))",
    "~causal - block(3) | summary(4, 2) & random(1, 4, 9)",
    "pattern p(w = n // 2 + 1) = local(w) - (where abs(q - k) == min(w, 3))",
    "axial",
    "pattern g(c = 50) = sliding_window(8) with softcap(c), alibi\ng(2)",
    "where q - k < 3 with softcap(0.25)",
]
PROGRAMS += [p.read_text() for p in sorted((Path(__file__).parents[1] / "examples").glob("*.pat"))]


def run_pipeline(text: str) -> None:
    try:
        p = parse_pattern(text)
        for n in (1, 7, 16):
            dense_mask(p, n, heads=HEADS)
    except PatternError:
        return
    assert parse_pattern(str(p)) == p, (text, str(p))


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz(500)
@given(st.text(alphabet=ALPHABET, max_size=120))
def test_random_characters(text):
    run_pipeline(text)


@fuzz(1000)
@given(st.lists(st.sampled_from(TOKENS), max_size=40), st.sampled_from([" ", ""]))
def test_random_tokens(tokens, glue):
    run_pipeline(glue.join(tokens))


@st.composite
def mutated_program(draw):
    text = draw(st.sampled_from(PROGRAMS))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["delete", "insert", "token", "swap", "duplicate"]))
        if kind == "delete" and text:
            j = draw(st.integers(i, min(len(text), i + 4)))
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(ALPHABET)) + text[i:]
        elif kind == "token":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif kind == "swap" and len(text) >= 2:
            i = min(i, len(text) - 2)
            text = text[:i] + text[i + 1] + text[i] + text[i + 2:]
        elif kind == "duplicate":
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:j] + text[i:j] + text[j:]
    return text


@fuzz(1000)
@given(mutated_program())
def test_mutated_programs(text):
    run_pipeline(text)
