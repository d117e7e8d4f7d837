"""Text -> syntax tree: ``parse_source(text, filename) -> ast.Module``.

The grammar is ``grammar/pattern.lark``, loaded once. Lark's LALR parser runs
the transformer below as it reduces each rule, so no parse tree is built and
nothing recurses, however deep the input nests; the finished tree is then
checked against ``MAX_DEPTH`` before any later stage walks it recursively.

Statements are separated by ``;`` or by a line break. A line break does not
end a statement inside brackets, after an operator, ``=``, ``,`` or a
keyword, or before a line that starts with a binary operator, so long
patterns can be written over several lines:

    pattern bigbird(w = 192, g = 64, r = 3, b = 128, seed = 0) =
        local(w) | global(g)
        | random(r, b, seed)

A line that starts with ``(`` starts a new statement (it is not a call of
the name that ends the line before).

Limits (every one raises ``LimitError`` at a located place):

- ``MAX_SOURCE_CHARS`` (256 KiB): the whole source, in characters;
- ``MAX_DEPTH`` (200): nested operators, calls, ``where``, ``heads`` and
  ``cycle`` (parentheses alone cost nothing; a chain ``a | b | c`` of one
  of ``| & and or`` is one level, a chain of ``-`` or ``+`` one per
  operator). The resolver applies it again after inlining definitions, and
  simplify.py to patterns built in Python;
- integer literals must not exceed ``ir.MAX_VALUE`` (int32).

Syntax errors name what was expected in words ("expected `)` or an
operator, found the end of the input") rather than in grammar terminals.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
from dataclasses import dataclass, field
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast, ir
from .cachedir import private_dir
from .errors import LimitError, Loc, PatternSyntaxError

# A pattern source is a few lines; this bound keeps a runaway input (a
# generated file, a wrong path) to well under a second of parsing.
MAX_SOURCE_CHARS = 256 * 1024

# Nesting of the syntax tree and of the IR after inlining. Later stages
# (printing, hashing, masks) recurse once or twice per level, so this stays
# well inside Python's default recursion limit of 1000.
MAX_DEPTH = 200

_MAX_DIGITS = len(str(ir.MAX_VALUE))


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("patterncc.grammar").joinpath("pattern.lark").read_text(encoding="utf-8")
    return Lark(
        grammar,
        parser="lalr",
        lexer="basic",
        postlex=_Statements(),
        transformer=_Build(),
        maybe_placeholders=False,
        cache=_tables_file(grammar),
    )


def _tables_file(grammar: str) -> str | bool:
    """Lark's cache of the grammar's LALR tables: building them is most of a
    new process's first parse (0.10 s against 0.01 s loaded), and a first
    call is on the clock. In patterncc's cache directory only where that is
    private (Lark's own default is a predictable name in the shared
    temporary folder, and the file is a pickle); else no cache. Lark checks
    the entry against the grammar, its options and its version, and
    rebuilds it when they differ or it cannot be read."""
    directory = private_dir()
    if directory is None:
        return False
    digest = hashlib.sha256(grammar.encode()).hexdigest()[:16]
    return str(directory / f"lark-{lark.__version__}-{digest}.pickle")


def parse_source(text: str, filename: str = "<pattern>") -> ast.Module:
    """Parse a whole source: definitions, then at most one final expression."""
    if not isinstance(text, str):
        raise TypeError(f"parse_source() takes str, got {type(text).__name__}")
    if len(text) > MAX_SOURCE_CHARS:
        raise LimitError(
            f"the source is {len(text)} characters long, over the limit of {MAX_SOURCE_CHARS}",
            Loc(1, 1, "", filename),
        )
    text = text.removeprefix("\ufeff")  # a byte order mark is not part of the first line
    state = _State(_display_lines(text), filename)
    token = _STATE.set(state)
    try:
        statements = _parser().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, state) from None
    finally:
        _STATE.reset(token)
    return _module(statements or (), filename)


def _module(statements: tuple, filename: str) -> ast.Module:
    for stmt in statements:
        too_deep = ast.deepest(stmt, MAX_DEPTH)
        if too_deep is not None:
            raise LimitError(
                f"nesting too deep: more than {MAX_DEPTH} levels of operators and calls",
                too_deep.loc,
            )
    for stmt in statements[:-1]:
        if not isinstance(stmt, ast.Definition):
            raise PatternSyntaxError(
                "only the last statement may be a bare expression; this one is followed by more statements",
                ast.start_loc(stmt),
                hint="give it a name with `pattern name = ...`, or move it to the end",
            )
    if statements and not isinstance(statements[-1], ast.Definition):
        return ast.Module(tuple(statements[:-1]), statements[-1], filename)
    return ast.Module(tuple(statements), None, filename)


# ----------------------------------------------------------------------------
# Per-parse state: the lines (for locations) and the brackets still open
# ----------------------------------------------------------------------------


@dataclass
class _State:
    lines: list[str]
    filename: str
    open_brackets: list[Token] = field(default_factory=list)
    previous: Token | None = None  # the last token passed to the parser


_STATE: contextvars.ContextVar[_State] = contextvars.ContextVar("patterncc_parse_state")

# Control characters would garble the quoted line; each becomes one space so
# the caret under it stays in its column.
_UNPRINTABLE = {c: " " for c in list(range(0x20)) + [0x7F]}


def _display_lines(text: str) -> list[str]:
    return text.translate(_UNPRINTABLE | {ord("\n"): "\n"}).split("\n")


def _loc_at(line: int, column: int) -> Loc:
    state = _STATE.get()
    text = state.lines[line - 1] if 0 < line <= len(state.lines) else ""
    return Loc(line, column, text, state.filename)


def _loc(token: Token) -> Loc:
    return _loc_at(token.line, token.column)


# ----------------------------------------------------------------------------
# Statements: `;` and meaningful line breaks become _SEP
# ----------------------------------------------------------------------------

_BINARY = {"VBAR", "AMP", "PLUS", "MINUS", "STAR", "FLOORDIV", "PERCENT", "COMPARE", "AND", "OR"}
# A line break right after one of these continues the statement.
_CONTINUE_AFTER = _BINARY | {
    "TILDE", "NOT", "WHERE", "PATTERN", "HEADS", "CYCLE", "WITH",
    "_LPAR", "_LBRACE", "_COMMA", "_EQUAL", "ARROW", "DOTDOT",
}
# A line that starts with one of these continues the statement before it.
_CONTINUE_BEFORE = _BINARY | {"_RPAR", "_RBRACE", "_COMMA", "_EQUAL", "ARROW", "DOTDOT", "WITH"}
_OPENING = {"_LPAR", "_LBRACE"}
_CLOSING = {"_RPAR", "_RBRACE"}


class _Statements:
    """Lark postlexer: turns `;` and statement-ending line breaks into _SEP."""

    always_accept = ("NEWLINE", "SEMICOLON")

    def process(self, stream):
        state = _STATE.get()
        opened = state.open_brackets
        pending = None  # a separator seen since the last token passed on
        for token in stream:
            if token.type == "NEWLINE":
                if not opened and state.previous is not None and state.previous.type not in _CONTINUE_AFTER:
                    pending = pending or token
                continue
            if token.type == "SEMICOLON":
                if opened:
                    yield Token.new_borrow_pos("_SEP", token.value, token)  # an error: `;` inside brackets
                elif state.previous is not None:
                    pending = token if pending is None or pending.type == "NEWLINE" else pending
                continue
            if pending is not None and not (pending.type == "NEWLINE" and token.type in _CONTINUE_BEFORE):
                yield Token.new_borrow_pos("_SEP", pending.value, pending)
            pending = None
            if token.type in _OPENING:
                opened.append(token)
            state.previous = token
            yield token
            # Resumed: the parser took the token, so a closing bracket matched.
            if token.type in _CLOSING and opened:
                opened.pop()


# ----------------------------------------------------------------------------
# The transformer: one small method per rule, building ast nodes
# ----------------------------------------------------------------------------


@v_args(inline=True)
class _Build(Transformer):
    def start(self, *statements):
        return statements

    def definition(self, keyword, name, *rest):
        params, body = rest if len(rest) == 2 else ((), rest[0])
        return ast.Definition(name.value, params, body, _loc(name))

    def param_list(self, *params):
        return params

    def param(self, name, default=None):
        return ast.Param(name.value, default, _loc(name))

    def where(self, keyword, cond):
        return ast.Where(cond, _loc(keyword))

    def or_test(self, *items):
        return _chain("or", items)

    def and_test(self, *items):
        return _chain("and", items)

    def unary(self, op, operand):
        return ast.Unary(op.value, operand, _loc(op))

    def comparison(self, *items):
        return ast.Compare(items[::2], tuple(op.value for op in items[1::2]), _loc(items[1]))

    def bor(self, *items):
        return _chain("|", items)

    def band(self, *items):
        return _chain("&", items)

    def arith(self, *items):
        return _left_fold(items)

    def term(self, *items):
        return _left_fold(items)

    def number(self, token):
        return ast.Num(_integer(token), _loc(token))

    def name(self, token):
        return ast.Name(token.value, _loc(token))

    def call(self, name, *args):
        return ast.Call(name.value, args, _loc(name))

    def keyword(self, name, value):
        return ast.Keyword(name.value, value, _loc(name))

    def heads(self, keyword, *ranges):
        return ast.Heads(ranges, _loc(keyword))

    def head_range(self, start, dots, stop, arrow, body):
        return ast.HeadRange(start, stop, body, ast.start_loc(start))

    def cycle(self, keyword, *parts):
        return ast.Cycle(parts, _loc(keyword))

    def scored(self, body, keyword, *terms):
        return ast.Scored(body, terms, _loc(keyword))

    def score_term(self, name, *args):
        return ast.ScoreTerm(name.value, args, _loc(name))

    def real(self, token):
        return ast.Real(float(token.value), _loc(token))


def _chain(op: str, items: tuple) -> ast.Chain:
    """``a OP b OP c`` arrives as ``(a, OP, b, OP, c)``; located at the first OP."""
    return ast.Chain(op, items[::2], _loc(items[1]))


def _left_fold(items: tuple) -> ast.Binary:
    """``a - b + c`` arrives as ``(a, -, b, +, c)`` and means ``(a - b) + c``."""
    node = items[0]
    for i in range(1, len(items), 2):
        node = ast.Binary(items[i].value, node, items[i + 1], _loc(items[i]))
    return node


def _integer(token: Token) -> int:
    digits = token.value.lstrip("0") or "0"
    if len(digits) > _MAX_DIGITS or int(digits) > ir.MAX_VALUE:
        shown = digits if len(digits) <= 30 else digits[:12] + "..." + digits[-6:]
        raise LimitError(f"the number {shown} is larger than the limit {ir.MAX_VALUE}", _loc(token))
    return int(digits)


# ----------------------------------------------------------------------------
# Syntax errors in words
# ----------------------------------------------------------------------------

_EXPRESSION_START = {"NAME", "NUMBER", "_LPAR", "MINUS", "TILDE", "NOT", "WHERE", "HEADS", "CYCLE"}
_KEYWORDS = {"PATTERN", "WHERE", "HEADS", "CYCLE", "OR", "AND", "NOT", "WITH"}
# After these only a pattern makes sense; after these only an integer.
_BEFORE_PATTERN = {"VBAR", "AMP", "TILDE", "ARROW"}
_BEFORE_INTEGER = {"PLUS", "STAR", "FLOORDIV", "PERCENT", "COMPARE", "DOTDOT"}
_WORDS = {
    "_RPAR": "`)`",
    "_RBRACE": "`}`",
    "_COMMA": "`,`",
    "ARROW": "`=>`",
    "DOTDOT": "`..`",
    "_EQUAL": "`=`",
    "_LPAR": "`(`",
    "_LBRACE": "`{`",
    "NAME": "a name",
    "NUMBER": "a number",
    "PATTERN": "`pattern`",
}
_OPERATOR_TEXT = {
    "VBAR": "|", "AMP": "&", "PLUS": "+", "MINUS": "-", "STAR": "*", "FLOORDIV": "//",
    "PERCENT": "%", "COMPARE": "<", "AND": "and", "OR": "or",
}


def _syntax_error(err: UnexpectedInput, state: _State) -> PatternSyntaxError:
    if isinstance(err, UnexpectedCharacters):
        return _bad_character(err, state)
    if isinstance(err, UnexpectedToken):
        return _bad_token(err, state)
    if isinstance(err, UnexpectedEOF):
        what = _expected(set(err.expected), state.previous)
        return PatternSyntaxError(f"expected {what}, found the end of the input", _end_loc(state))
    return PatternSyntaxError(str(err).splitlines()[0], _loc_in(state, err.line, err.column))


def _loc_in(state: _State, line, column) -> Loc:
    if not isinstance(line, int) or line < 1:
        return _end_loc(state)
    text = state.lines[line - 1] if line <= len(state.lines) else ""
    return Loc(line, column, text, state.filename)


def _end_loc(state: _State) -> Loc:
    """Just after the end of the last token."""
    last = state.previous
    if last is None or last.end_line is None:
        return Loc(1, 1, state.lines[0] if state.lines else "", state.filename)
    return _loc_in(state, last.end_line, last.end_column)


_CHARACTER_HINTS = {
    "/": "integer division is `//`",
    "!": "the complement of a pattern is `~`; in a condition use `not` or `!=`",
    "^": "there is no symmetric difference; write `(A - B) | (B - A)`",
    "[": "group with parentheses `( )`",
    "]": "group with parentheses `( )`",
    ".": "head ranges are written `start..stop`",
    '"': "the language has no strings",
    "'": "the language has no strings",
}


def _bad_character(err: UnexpectedCharacters, state: _State) -> PatternSyntaxError:
    char = err.char
    if char.isprintable() and not char.isspace():
        shown = f"`{char}`"
    else:
        shown = f"U+{ord(char):04X}" + (" (a NUL byte)" if char == "\0" else "")
    hint = _CHARACTER_HINTS.get(char)
    if hint is None and char.isalpha():
        hint = "names use ASCII letters, digits and `_`"
    return PatternSyntaxError(f"unexpected character {shown}", _loc_in(state, err.line, err.column), hint=hint)


def _bad_token(err: UnexpectedToken, state: _State) -> PatternSyntaxError:
    token = err.token
    # `accepts` replays the parser on each terminal: exact, unlike LALR's `expected`.
    accepted = set(err.accepts or err.expected)
    loc = _end_loc(state) if token.type == "$END" else _loc_in(state, token.line, token.column)
    hint = None
    if token.type in _CLOSING and not state.open_brackets:
        return PatternSyntaxError(f"unmatched `{token.value}`", loc)
    if token.type == "WITH" and state.open_brackets:
        return PatternSyntaxError(
            "`with` cannot be inside brackets: score terms apply to the whole attention",
            loc,
            hint="put `with` after the whole pattern: `causal & (local(8) | sink(4)) with softcap(50)`",
        )
    if token.type == "WHERE" and "_LPAR" in accepted:
        return PatternSyntaxError(
            "`where` must be in parentheses here",
            loc,
            hint="a `where` takes everything to its right, so inside a combination "
            "write it in parentheses: `causal & (where k % 2 == 0)`",
        )
    if token.type == "$END" and state.open_brackets:
        bracket = state.open_brackets[-1]
        hint = f"the `{bracket.value}` on line {bracket.line}, column {bracket.column} is not closed"
    elif token.type == "_EQUAL" and "COMPARE" in accepted:
        hint = "`=` belongs to definitions, defaults and keyword arguments; compare with `==`"
    elif token.type == "PATTERN":
        hint = "put each definition on its own line, or separate them with `;`"
    elif token.type in _KEYWORDS and "NAME" in accepted:
        hint = f"`{token.value}` is a keyword and cannot be used as a name"
    elif "VBAR" in accepted and token.type in _EXPRESSION_START:
        hint = "combine patterns with `|`, `&` or `-`; separate statements with a new line or `;`"
    what = _expected(accepted, state.previous)
    return PatternSyntaxError(f"expected {what}, found {_found(token)}", loc, hint=hint)


def _found(token: Token) -> str:
    if token.type == "$END":
        return "the end of the input"
    if token.type == "_SEP":
        return "the end of the line" if token.value == "\n" else "`;`"
    if token.type == "NAME":
        return f"the name `{token.value}`"
    if token.type == "NUMBER":
        value = token.value if len(token.value) <= 20 else token.value[:12] + "..."
        return f"the number {value}"
    if token.type in _KEYWORDS:
        return f"the keyword `{token.value}`"
    return f"`{token.value}`"


def _expected(accepted: set[str], previous: Token | None) -> str:
    """The terminals the parser would have accepted, in words."""
    accepted = set(accepted)
    words = []
    if {"NAME", "NUMBER", "_LPAR"} <= accepted:
        kind = previous.type if previous is not None else None
        words.append("a pattern" if kind in _BEFORE_PATTERN else "a value" if kind in _BEFORE_INTEGER else "an expression")
        accepted -= _EXPRESSION_START
    operators = accepted & _BINARY
    if operators:
        accepted.discard("_LPAR")  # only the `(` of a call after a name: not worth saying
    words += [word for terminal, word in _WORDS.items() if terminal in accepted]
    if len(operators) >= 3:
        words.append("an operator")
    else:
        words += [f"`{_OPERATOR_TEXT[t]}`" for t in sorted(operators)]
    if {"_SEP", "$END"} <= accepted:
        words.append("the end of the statement")
    elif "$END" in accepted:
        words.append("the end of the input")
    elif "_SEP" in accepted:
        words.append("a new line or `;`")
    if not words:
        return "something else"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
