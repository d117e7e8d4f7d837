"""patterncc in one page: parse a pattern, look at its layout and plan, run it.

    python examples/quickstart.py

On a CPU-only machine the attention runs on the float64 reference backend;
on a GPU it runs the generated Triton kernels (with the planner's plan).
"""

from pathlib import Path

import torch

import patterncc as pcc

HERE = Path(__file__).resolve().parent  # run from any directory

# 1. A pattern: the Sparse Transformer's strided attention, from a file or a string.
pat = pcc.load(HERE / "strided.pat", l=64)  # keyword arguments override the file's defaults
assert pat == pcc.parse("causal & (local(64) | stride(64))")
print("pattern:", pat)

# 2. Its block layout at 4096 tokens: analytic, no n * n work.
lay = pcc.layout(pat, seq_len=4096, block=64)
print(lay.describe(max_width=32))

# 3. The plan: the stride part runs in residue order, where it is block-dense.
print(pcc.plan(pat, seq_len=4096, block=64).describe())

# 4. Attention, checked against a dense masked softmax.
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float64
n = 1024 if device == "cuda" else 300
q, k, v = (torch.randn(1, 4, n, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
attn = pcc.compile(pat)  # backend="auto": Triton on CUDA tensors, reference on CPU ones
o = attn(q, k, v)
o.sum().backward()

allowed = torch.from_numpy(pcc.mask(pat, seq_len=n)).to(device)
scores = (q.double() @ k.double().transpose(-1, -2)) / 64**0.5
expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()
err = ((o.double() - expected).norm() / expected.norm()).item()
print(f"{device}: relative error against dense masked attention {err:.1e}; dq norm {q.grad.norm():.3f}")
assert err < (2e-2 if dtype == torch.bfloat16 else 1e-12)
