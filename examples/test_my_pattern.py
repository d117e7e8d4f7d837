"""Property-test examples/my_pattern.pat with patterncc's kit: copy this file
next to your own pattern and change the name. Run: pytest examples/test_my_pattern.py

check_pattern checks the block layout against the element mask over random
lengths and block sizes, and every backend available here (the reference
always, Triton on a GPU or under TRITON_INTERPRET=1) against the float64
reference, forward and backward. A failure prints the minimal counterexample
hypothesis found and a command that reproduces it.
"""

from pathlib import Path

import pytest

import patterncc as pcc
from patterncc.testing import check_pattern

PAT_FILE = Path(__file__).with_name("my_pattern.pat")


# The defaults, and small parameters so that short test sequences see every part.
@pytest.mark.parametrize("params", [{}, {"w": 3, "every": 8, "d": 2}])
def test_my_pattern(params):
    report = check_pattern(pcc.load(PAT_FILE, **params), examples=20)
    assert report.ok, report
