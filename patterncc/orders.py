"""Token orders: how a planned component's kernel slots map to token positions.

The planner gives each component of a pattern the token order that makes it
block-dense (``planner.py``); the kernels then walk *slots* ``t`` and read
and write the token at position ``p`` of each:

- ``natural``: ``p = t``, ``n`` slots;
- ``residue(l)``: ``p = (t % S) * l + t // S`` with ``S = ceil(n / l)``,
  ``l * S`` slots (slots with ``p >= n`` are padding): the tokens of one
  residue class ``p % l`` are contiguous, so ``stride(l)`` becomes
  ``block(S)``;
- ``columns(l, c)``: ``p = (t // c) * l + (l - c) + t % c``, ``c * S``
  slots: the last ``c`` of every run of ``l`` (the keys of ``summary(l,
  c)``) gathered, in order.

This module is each order's one home: its positions (numpy, slot to token)
and their inverse, its count of slots, its position as an IR expression (the
planner rewrites a component's predicate over slots with it), and its
integer code and parameters for the kernels (``SlotOrder``). The kernels'
side is one jit function, ``_token(slot, ORDER, L, S, C)`` in
``backends/triton/kernels.py``, which reads ``SlotOrder``'s codes and
parameters; ``tests/test_orders.py`` checks, order by order, that it and
``positions`` agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .nodes import BinOp, Call, Const, Expr, Var


@dataclass(frozen=True)
class TokenOrder:
    """A token order (one of the subclasses below); frozen and hashable, so
    that pairs of them key the planner's pieces.

    ``n`` (the tokens) may be an int or an int64 array wherever a method
    takes it, except in ``positions``, ``slots`` and ``position_expr``."""

    KIND: ClassVar[str]
    CODE: ClassVar[int]  # the kernels' ORDER (``_token``)
    COVERS: ClassVar[bool]  # every token has a slot: a launch in this order writes every row of its axis

    @property
    def kind(self) -> str:
        return self.KIND

    @property
    def code(self) -> int:
        return self.CODE

    @property
    def reordered(self) -> bool:
        """False for natural order, the kernels' plain walk."""
        return self.CODE != Natural.CODE

    def classes(self, n):
        """``S = ceil(n / l)``: the slots per residue class (the kernels'
        ORD_S), the runs of ``l`` gathered from; ``n`` in natural order
        (``l`` is 1 there)."""
        return -(-n // self.l)

    def length(self, n):
        """The slots of ``n`` tokens, padding included."""
        raise NotImplementedError

    def filled(self, n):
        """The slots that hold a token (the tokens with a slot)."""
        raise NotImplementedError

    def positions(self, t: np.ndarray, n: int) -> np.ndarray:
        """int64 token positions of slots ``t``; ``-1`` for padding slots."""
        p = self._position(np.asarray(t, dtype=np.int64), n)
        return np.where(p < n, p, -1)

    def slots(self, p: np.ndarray, n: int) -> np.ndarray:
        """int64 slots of token positions ``p`` (the inverse of
        ``positions``); ``-1`` for tokens this order leaves out."""
        raise NotImplementedError

    def kernel_args(self, n) -> tuple:
        """``(L, S, C)``: what ``_token`` reads besides the code (ORD_L,
        ORD_S, ORD_C); C is 1 but for gathered columns."""
        return self.l, self.classes(n), 1

    def position_expr(self, var: str, S) -> Expr:
        """The token position of slot ``var`` as an IR expression; ``S`` is
        the residue class size (an int, or an expression over ``n``)."""
        raise NotImplementedError

    def formula(self) -> str:
        raise NotImplementedError

    def _position(self, t: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def of(spec: tuple) -> "TokenOrder":
        """The order a primitive's hint names (``order_hint``): ``("natural",)``,
        ``("residue", l)`` or ``("columns", l, c)``."""
        kind, *args = spec
        return ORDERS[kind](*args)


@dataclass(frozen=True)
class Natural(TokenOrder):
    """``p = t``: the tokens as they are."""

    KIND: ClassVar[str] = "natural"
    CODE: ClassVar[int] = 0
    COVERS: ClassVar[bool] = True
    l: ClassVar[int] = 1

    def length(self, n):
        return n

    def filled(self, n):
        return n

    def _position(self, t, n):
        return t

    def slots(self, p, n):
        p = np.asarray(p, dtype=np.int64)
        return np.where(p < n, p, -1)

    def position_expr(self, var, S):
        return Var(var)

    def __str__(self) -> str:
        return "natural"

    def formula(self) -> str:
        return "p = t"


@dataclass(frozen=True)
class Residue(TokenOrder):
    """``p = (t % S) * l + t // S``, ``S = ceil(n / l)``: each residue class
    ``p % l`` contiguous, ``S`` slots each; the classes that hold ``S - 1``
    tokens end in a padding slot."""

    l: int
    KIND: ClassVar[str] = "residue"
    CODE: ClassVar[int] = 1
    COVERS: ClassVar[bool] = True

    def length(self, n):
        return self.l * self.classes(n)

    def filled(self, n):
        return n

    def _position(self, t, n):
        S = self.classes(n)
        return (t % S) * self.l + t // S

    def slots(self, p, n):
        p = np.asarray(p, dtype=np.int64)
        return np.where(p < n, (p % self.l) * self.classes(n) + p // self.l, -1)

    def position_expr(self, var, S):
        t = Var(var)
        if isinstance(S, int):
            return BinOp("+", BinOp("*", BinOp("%", t, Const(S)), Const(self.l)), BinOp("//", t, Const(S)))
        # Over the kernels' runtime S: t // S <= l - 1 for every slot t < l * S,
        # written min(t // S, l - 1) so that the code generator can bound the
        # position below 2**31 and compute it in int32 (with native division).
        cls = Call("min", (BinOp("//", t, S), Const(self.l - 1)))
        return BinOp("+", BinOp("*", BinOp("%", t, S), Const(self.l)), cls)

    def __str__(self) -> str:
        return f"residue({self.l})"

    def formula(self) -> str:
        return f"p = (t % S) * {self.l} + t // S, S = ceil(n / {self.l})"


@dataclass(frozen=True)
class Columns(TokenOrder):
    """``p = (t // c) * l + (l - c) + t % c``: the last ``c`` positions of
    every run of ``l``, in order (``c * ceil(n / l)`` slots; those past the
    last token are padding). Only keys are gathered: its launches leave the
    other keys' rows alone."""

    l: int
    c: int
    KIND: ClassVar[str] = "columns"
    CODE: ClassVar[int] = 2
    COVERS: ClassVar[bool] = False

    def length(self, n):
        return self.c * self.classes(n)

    def filled(self, n):
        """The gathered tokens ``< n``, which come first in slot order."""
        return self.count_before(n)

    def count_before(self, p):
        """The gathered tokens before position ``p`` (the slot of the first
        gathered token at or after ``p``); an int for an int."""
        l, c = self.l, self.c
        if isinstance(p, (int, np.integer)):
            return int((p // l) * c + min(c, max(0, p % l - (l - c))))
        return (p // l) * c + np.clip(p % l - (l - c), 0, c)

    def kernel_args(self, n) -> tuple:
        return self.l, self.classes(n), self.c

    def _position(self, t, n):
        return (t // self.c) * self.l + (self.l - self.c) + t % self.c

    def slots(self, p, n):
        p = np.asarray(p, dtype=np.int64)
        gathered = (p < n) & (p % self.l >= self.l - self.c)
        return np.where(gathered, self.count_before(p), -1)

    def position_expr(self, var, S):
        t, l, c = Var(var), self.l, self.c
        return BinOp("+", BinOp("+", BinOp("*", BinOp("//", t, Const(c)), Const(l)), Const(l - c)),
                     BinOp("%", t, Const(c)))

    def __str__(self) -> str:
        return f"columns({self.l}, {self.c})"

    def formula(self) -> str:
        return f"p = (t // {self.c}) * {self.l} + {self.l - self.c} + t % {self.c}"


ORDERS = {cls.KIND: cls for cls in (Natural, Residue, Columns)}
_BY_CODE = {cls.CODE: cls for cls in ORDERS.values()}
NATURAL = Natural()


def shaping(q_order: TokenOrder, k_order: TokenOrder) -> TokenOrder:
    """The order of a (query, key) pair whose parameters the kernels read:
    the queries' where they are reordered (residue: both sides alike), else
    the keys' (gathered columns)."""
    return q_order if q_order.reordered else k_order


@dataclass(frozen=True)
class SlotOrder:
    """A component's orders as the kernels take them: ``q``/``k`` the codes
    (``Q_ORDER``, ``K_ORDER``: 0 natural, 1 residue(l), 2 columns(l, c)),
    ``l``, ``S``, ``c`` their parameters (``_token``'s L, S, C) at one length."""

    q: int = Natural.CODE
    k: int = Natural.CODE
    l: int = 1
    S: int = 1
    c: int = 1

    @staticmethod
    def of(q_order: TokenOrder, k_order: TokenOrder, n: int) -> "SlotOrder":
        """A component's (query, key) orders at ``n`` tokens."""
        return SlotOrder(q_order.code, k_order.code, *shaping(q_order, k_order).kernel_args(n))

    def args(self, tokens: int) -> tuple[int, int, int, int]:
        """N_TOK, ORD_L, ORD_S, ORD_C for the kernels."""
        return tokens, self.l, self.S, self.c

    @property
    def covers_queries(self) -> bool:
        """Every query has a slot: a launch writes every row of o, lse and dq."""
        return _BY_CODE[self.q].COVERS

    @property
    def covers_keys(self) -> bool:
        """Every key has a slot: a launch writes every row of dk and dv."""
        return _BY_CODE[self.k].COVERS
