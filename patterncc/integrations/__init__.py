"""Bridges to other libraries; each module imports its library only when used
(``patterncc.integrations.transformers`` needs the ``hf`` extra)."""
