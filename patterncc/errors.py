"""One rooted hierarchy for everything wrong with a pattern.

Every error carries the 1-based ``line`` and ``column`` of the text it is
about (when there is text) and shows that line with a caret under the column,
the way Lark's ``UnexpectedInput.get_context`` does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loc:
    """Where a node came from: 1-based line and column, and the line's text."""

    line: int
    column: int
    text: str = ""
    filename: str = "<pattern>"


class PatternError(ValueError):
    """Base class of every problem in a pattern (syntax, names, values, heads)."""

    def __init__(self, message: str, loc: Loc | None = None, *, hint: str | None = None):
        self.message = message
        self.loc = loc
        self.hint = hint
        self.line = loc.line if loc else None
        self.column = loc.column if loc else None
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        if self.loc is not None:
            parts.append(f"{self.loc.filename}:{self.loc.line}:{self.loc.column}: {self.message}")
            if self.loc.text:
                text = self.loc.text.rstrip("\n")
                # Long lines are cut around the column so the caret stays readable.
                start = max(0, self.loc.column - 60)
                shown = text[start : start + 120]
                prefix = "..." if start else ""
                parts.append(f"    {prefix}{shown}")
                parts.append("    " + " " * (len(prefix) + self.loc.column - 1 - start) + "^")
        else:
            parts.append(self.message)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class PatternSyntaxError(PatternError):
    """The text does not follow the grammar; the message says what was expected."""


class UnknownNameError(PatternError):
    """A pattern, parameter or function name that is not defined."""


class ArityError(PatternError):
    """A call with the wrong number of arguments."""


class PatternValueError(PatternError):
    """A value out of range (``stride(0)``, ``summary(8, 9)``) or not an integer."""


class RecursiveDefinitionError(PatternError):
    """A definition that calls itself, directly or through others."""


class HeadsError(PatternError):
    """``heads { .. }`` ranges that overlap or do not cover every head."""


class LimitError(PatternError):
    """Input beyond a documented limit: nesting too deep, a number too large,
    a mask or layout too big to build."""
