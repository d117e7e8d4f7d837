"""Bad attention inputs are refused with a message that names the argument.

Every backend that can run here gets the same inputs: wrong shapes, dtypes,
devices, strides, sequence lengths, head counts and scales. A refusal must be
a ValueError or TypeError (PatternError for the pattern's own heads) whose
message names what is wrong; never a numpy broadcasting error, an IndexError
or a Triton compile failure from deep inside. Inputs that are merely unusual
(non-contiguous, float64) either work, matching contiguous float32 inputs, or
are refused the same way.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch

import patterncc as pcc
from patterncc import PatternError, ir

PAT = ir.Causal() & (ir.Local(3) | ir.Sink(1))

HAVE_TRITON_RUNTIME = importlib.util.find_spec("patterncc.backends.triton.runtime") is not None


def _triton_skip_reason() -> str | None:
    if not HAVE_TRITON_RUNTIME:
        return "backends/triton/runtime.py does not exist yet"
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return "no CUDA device and TRITON_INTERPRET is not 1 (scripts/test.sh sets it)"
    return None


BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("triton", id="triton", marks=pytest.mark.skipif(_triton_skip_reason() is not None,
                                                                 reason=str(_triton_skip_reason()))),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def device_of(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def tensors(backend, B=1, H=2, Hkv=1, n=12, D=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    dev = device_of(backend)
    q = torch.randn(B, H, n, D, generator=gen).to(dev, dtype)
    k = torch.randn(B, Hkv, n, D, generator=gen).to(dev, dtype)
    v = torch.randn(B, Hkv, n, D, generator=gen).to(dev, dtype)
    return q, k, v


def refused(attn, *args, names: list[str], types=(ValueError, TypeError), **kwargs) -> str:
    """Call ``attn``; it must raise one of ``types`` whose message matches
    every regex in ``names``. Returns the message."""
    with pytest.raises(types) as info:
        attn(*args, **kwargs)
    msg = str(info.value)
    for name in names:
        assert re.search(name, msg), f"{type(info.value).__name__} {msg!r} does not mention {name!r}"
    return msg


# -- shapes -------------------------------------------------------------------------


def test_q_not_4d(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q[0], k, v, names=[r"\bq\b", r"4-D|\(B, H, n, D\)"])


def test_k_not_4d(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q, k[0], v, names=[r"\bk\b", r"4-D|\(B, H, n, D\)"])


def test_v_shape_differs_from_k(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q, k, v[..., :8], names=[r"\bv\b"])


def test_head_dim_mismatch(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q, k[..., :8], v[..., :8], names=[r"\bk\b", r"head dim|\bD\b"])


def test_sequence_length_mismatch(backend):
    q, k, v = tensors(backend, n=12)
    refused(pcc.compile(PAT, backend=backend), q, k[:, :, :10], v[:, :, :10],
            names=[r"\bk\b", r"sequence length|\bn\b"])


def test_batch_mismatch(backend):
    q, k, v = tensors(backend, B=2)
    refused(pcc.compile(PAT, backend=backend), q, k[:1], v[:1], names=[r"\bk\b", r"batch|\bB\b"])


def test_kv_heads_must_divide_query_heads(backend):
    q, k, v = tensors(backend, H=4, Hkv=3)
    refused(pcc.compile(PAT, backend=backend), q, k, v, names=[r"\bHkv\b|kv heads", r"\bH\b|heads"])


def test_empty_sequence_is_refused(backend):
    q, k, v = tensors(backend, n=0)
    # naming the dimension, or showing q's shape with the 0 in it
    refused(pcc.compile(PAT, backend=backend), q, k, v, names=[r"\bq\b", r"sequence length|\bn\b|\(1, 2, 0, 16\)"])


def test_heads_block_must_cover_the_query_heads(backend):
    pat = ir.Heads((ir.HeadRange(0, 2, ir.Causal()), ir.HeadRange(2, 4, ir.Local(2))))
    q, k, v = tensors(backend, H=2, Hkv=2)
    msg = refused(pcc.compile(pat, backend=backend), q, k, v, names=[r"heads"], types=(PatternError,))
    assert "4" in msg and "2" in msg


# -- dtypes and devices -------------------------------------------------------------


def test_integer_dtype(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q.to(torch.int32), k, v, names=[r"\bq\b", r"dtype|int32"])


def test_mixed_dtypes(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q, k.half(), v.half(), names=[r"\bk\b", r"dtype|float16"])


def test_mixed_devices(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q, k.to("meta"), v, names=[r"\bk\b", r"device"])


def test_not_tensors(backend):
    q, k, v = tensors(backend)
    refused(pcc.compile(PAT, backend=backend), q.tolist(), k, v, names=[r"\bq\b"])


def test_bad_scale(backend):
    q, k, v = tensors(backend)
    attn = pcc.compile(PAT, backend=backend)
    refused(attn, q, k, v, scale=float("nan"), names=[r"\bscale\b"])
    refused(attn, q, k, v, scale="0.5", names=[r"\bscale\b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_inputs_to_cuda_kernels_are_refused():
    if _triton_skip_reason() is not None:
        pytest.skip(_triton_skip_reason())
    q, k, v = tensors("reference")  # CPU tensors
    refused(pcc.compile(PAT, backend="triton"), q, k, v, names=[r"\bq\b", r"device|cuda|CUDA"])


# -- strides and unusual but valid inputs -------------------------------------------


def _works_or_refused(attn, q, k, v, names):
    """Either the result equals the one for contiguous copies, or a clean refusal."""
    try:
        o, lse = attn(q, k, v, return_lse=True)
    except (ValueError, TypeError) as err:
        msg = str(err)
        for name in names:
            assert re.search(name, msg), f"{type(err).__name__} {msg!r} does not mention {name!r}"
        return
    o_ref, lse_ref = attn(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_transposed_layout_inputs(backend):
    # (B, n, H, D) storage viewed as (B, H, n, D): the usual layout after a projection.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in tensors(backend, H=2, Hkv=2))
    assert not q.is_contiguous()
    _works_or_refused(pcc.compile(PAT, backend=backend), q, k, v, names=[r"\b[qkv]\b", r"stride|contiguous"])


def test_last_dim_not_contiguous(backend):
    q, k, v = tensors(backend, D=32)
    q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]
    assert q.stride(-1) == 2
    _works_or_refused(pcc.compile(PAT, backend=backend), q, k, v, names=[r"\b[qkv]\b", r"stride|contiguous"])


def test_float64_inputs(backend):
    q, k, v = tensors(backend, dtype=torch.float64)
    attn = pcc.compile(PAT, backend=backend)
    try:
        o = attn(q, k, v)
    except (ValueError, TypeError) as err:
        assert re.search(r"dtype|float64", str(err)), str(err)
        return
    o32 = attn(q.float(), k.float(), v.float())
    torch.testing.assert_close(o.float(), o32, rtol=1e-4, atol=1e-4)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend='cuda'.*reference"):
        pcc.compile(PAT, backend="cuda")


class _TightKernel:
    """A stand-in for a Triton kernel that fits the card's shared memory only
    with ``fits`` pipeline stages or fewer, and records each launch's stages."""

    def __init__(self, fits: int, resource: str = "shared memory"):
        self.fits, self.resource, self.launches = fits, resource, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((kwargs["num_stages"], kwargs["NUM_STAGES"]))
            if kwargs["num_stages"] > self.fits:
                from triton.runtime.errors import OutOfResources

                raise OutOfResources(233472, 232448, self.resource)
            return args

        return run


@pytest.mark.skipif(not HAVE_TRITON_RUNTIME, reason="needs the Triton runtime")
def test_a_launch_over_the_shared_memory_retries_with_fewer_stages_and_keeps_them():
    from patterncc.backends.triton.config import default_config
    from patterncc.backends.triton.runtime import _Run

    run = _Run(None, None, default_config(128), 128, 1, 1, 16, torch.bfloat16)
    kernel, other = _TightKernel(fits=1), _TightKernel(fits=3)
    assert run._launch(kernel, (1,))("q", num_stages=3, NUM_STAGES=3) == ("q",)
    assert kernel.launches == [(3, 3), (2, 2), (1, 1)]
    run._launch(kernel, (1,))("q", num_stages=3, NUM_STAGES=3)
    assert kernel.launches[3:] == [(1, 1)]  # the stages that fit are remembered per kernel
    run._launch(other, (1,))(num_stages=3, NUM_STAGES=3)
    assert other.launches == [(3, 3)]  # another kernel keeps its own


@pytest.mark.skipif(not HAVE_TRITON_RUNTIME, reason="needs the Triton runtime")
def test_a_launch_over_other_resources_or_at_one_stage_raises():
    from triton.runtime.errors import OutOfResources

    from patterncc.backends.triton.config import default_config
    from patterncc.backends.triton.runtime import _Run

    run = _Run(None, None, default_config(128), 128, 1, 1, 16, torch.bfloat16)
    with pytest.raises(OutOfResources, match="registers"):
        run._launch(_TightKernel(fits=0, resource="registers"), (1,))(num_stages=3, NUM_STAGES=3)
    tight = _TightKernel(fits=0)
    with pytest.raises(OutOfResources, match="shared memory"):
        run._launch(tight, (1,))(num_stages=2, NUM_STAGES=2)
    assert tight.launches == [(2, 2), (1, 1)]
