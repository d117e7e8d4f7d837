"""patterncc: a compiler for sparse attention patterns."""
