"""Setup shared by every test file.

Triton decides when it is imported whether ``@triton.jit`` makes compiled or
interpreted functions, its own standard library (``tl.cdiv``, ...) included.
Some tests run code the way a user without ``TRITON_INTERPRET`` would (the
README's Python blocks unset it). Were Triton first imported inside one of
them, every later interpreted kernel would call compiled standard-library
functions and fail ("Cannot call @triton.jit'd outside of the scope of a
kernel"). Importing it here, under the environment the suite started with,
makes the outcome independent of test order and of how pytest-xdist deals
the tests out to its workers. Without a GPU the interpreter is the only way
the kernels run, so there it is set first (as ``scripts/test.sh`` does), and
any one file runs alone as it does in the suite.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError:  # the reference backend's tests still run
    pass
