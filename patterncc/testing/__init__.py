"""Property-test a sparse attention pattern: hypothesis strategies, assertions
and a ready-made suite.

    import patterncc as pcc
    from patterncc.testing import check_pattern

    def test_my_pattern():
        report = check_pattern(pcc.load("my_pattern.pat"))
        assert report.ok, report

``check_pattern`` runs, for one pattern, (1) its block layout against the
classes brute-forced from the element mask, over random lengths, block sizes
and head counts, and (2) every attention backend available on this machine
against the float64 reference, forward (``o``, ``lse``) and backward (``dq``,
``dk``, ``dv``, and the gradients of the score terms' tensors), over random
shapes, dtypes and scales, and (3) every backend's packed batches
(``cu_seqlens``) against each sequence computed alone. The reference itself is
checked against an independent dense float64 computation in this module
(torch autograd). A failure comes back shrunk by hypothesis to a minimal
counterexample, with a shell command that reproduces it.

The pieces, for writing your own properties:

- strategies: ``patterns(...)`` (well-formed IR patterns over every primitive
  and combinator; ``terms=True`` adds score terms, ``with softcap(c), alibi``),
  ``where_conditions(...)``, ``attention_inputs(...)`` (an ``AttentionCase``;
  ``terms=True`` draws the call's term tensors too), ``packed_inputs(...)``
  and ``packed_lengths(...)`` (packed batches: sequence lengths with
  boundaries inside blocks and on their edges), ``make_tensors(case)``,
  ``make_terms(case)`` and ``make_cu_seqlens(case)``;
- assertions: ``assert_layout_sound(pat, seq_len, block, heads)``,
  ``assert_matches_reference(attn, pat, q, k, v, sinks=..., rel_bias=...,
  alibi_slopes=...)`` and ``assert_packed_matches_reference(attn, pat, q, k,
  v, cu_seqlens, ...)`` (a packed call against each sequence alone);
- brute force: ``block_classes(...)`` and ``dense_attention(...)``;
- ``run_files(files)``, behind ``patterncc test FILE...``.

The modules, in the order a check uses them: ``strategies`` (patterns and
call inputs), ``oracles`` (brute force and float64 expected values),
``assertions`` (layout and attention checks, ``TOLERANCES``), ``suite``
(``check_pattern`` and its report) and ``runner`` (``patterncc test``).
Import from ``patterncc.testing``; the names below are its public interface.
"""

from .assertions import (
    TOLERANCES,
    Tolerance,
    assert_layout_sound,
    assert_matches_reference,
    assert_packed_matches_reference,
)
from .oracles import block_classes, dense_attention
from .runner import file_entries, run_files
from .strategies import (
    SOFTCAPS,
    AttentionCase,
    attention_inputs,
    make_cu_seqlens,
    make_tensors,
    make_terms,
    packed_inputs,
    packed_lengths,
    patterns,
    where_conditions,
)
from .suite import CheckResult, Counterexample, Report, available_backends, check_pattern, checked_backends, reproduce

__all__ = [
    "AttentionCase",
    "Counterexample",
    "Report",
    "TOLERANCES",
    "Tolerance",
    "assert_layout_sound",
    "assert_matches_reference",
    "assert_packed_matches_reference",
    "available_backends",
    "block_classes",
    "check_pattern",
    "dense_attention",
    "make_cu_seqlens",
    "make_tensors",
    "make_terms",
    "attention_inputs",
    "packed_inputs",
    "packed_lengths",
    "patterns",
    "reproduce",
    "run_files",
    "where_conditions",
]

