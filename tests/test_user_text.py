"""No text a user writes reaches generated kernel source: only integers and
fixed operators do. Names, parameters and comments (with quotes, newlines
and code in them) are resolved away by the front end."""

from __future__ import annotations

import re

from hypothesis import given, settings, strategies as st

import patterncc as pcc
from patterncc.backends.triton import codegen

KEYWORDS = {"pattern", "where", "and", "or", "not", "heads", "cycle", "all", "none", "causal", "local", "stride",
            "block", "summary", "global", "sink", "dilated", "random", "isqrt", "abs", "min", "max", "q", "k", "h", "n"}
# Marked names, so none can coincide with a word of the kernel template.
NAMES = st.from_regex(r"zz[a-z][a-z0-9_]{3,12}", fullmatch=True).filter(lambda s: s not in KEYWORDS)
COMMENT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"), max_size=60)


@settings(max_examples=40, deadline=None)
@given(name=NAMES, param=NAMES, helper=NAMES, comment=COMMENT, width=st.integers(1, 64))
def test_names_and_comments_never_reach_kernel_source(name, param, helper, comment, width):
    if len({name, param, helper}) < 3:
        return
    source = (
        f"# {comment}\n"
        f"pattern {helper}({param} = {width}) = causal & local({param})  # {comment}\n"
        f"pattern {name}({param} = 3) = {helper}({param} * 2) | (causal & (where k % {param} == 0))\n"
    )
    pat = pcc.parse(source)
    generated = codegen.generate_source(pat)
    for text in (name, param, helper):
        assert not re.search(rf"\b{re.escape(text)}\b", generated), f"{text!r} reached the kernel source"
    if len(comment.strip()) >= 8:
        assert comment.strip() not in generated


def test_code_in_a_comment_or_string_is_not_run():
    hostile = (
        "# __import__('os').system('echo pwned')\n"
        "pattern p() = causal  # \"; import os; os._exit(3); \"\n"
    )
    generated = codegen.generate_source(pcc.parse(hostile))
    for text in ("pwned", "_exit", "__import__", "system("):
        assert text not in generated


def test_quotes_and_odd_characters_are_syntax_errors_with_locations():
    for text in ("causal & 'local(3)'", 'causal | "x"', "causal & local(3)\\", "causal ; rm -rf /", "local(3) $"):
        try:
            pcc.parse(text)
        except pcc.PatternError as err:
            assert err.line == 1 and err.column >= 1 and "^" in str(err)
        else:
            raise AssertionError(f"{text!r} parsed")
