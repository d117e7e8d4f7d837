"""The standard library's patterns (grammar/stdlib.pat), written
with IR nodes, for tests that must not depend on the parser."""

from patterncc import ir

C = ir.Causal()


def strided(l):
    return C & (ir.Local(l) | ir.Stride(l))


def fixed(l, c):
    return C & (ir.Block(l) | ir.Summary(l, c))


def sliding_window(w):
    return C & ir.Local(w)


def chunked(l):
    return C & ir.Block(l)


def local_global(w, g):
    return C & (ir.Local(w) | ir.Global(g))


def longformer(w, g):
    return ir.Local(w) | ir.Global(g)


def bigbird(w, g, r, b, seed):
    return ir.Local(w) | ir.Global(g) | ir.Random(r, b, seed)


def axial(width):
    return C & (ir.Block(width) | ir.Stride(width))
