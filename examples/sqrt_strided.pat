# Strided attention with the paper's choice l = sqrt(n): the stride follows the
# sequence length, so kernels are specialized per length.
pattern sqrt_strided() = causal & (local(isqrt(n)) | stride(isqrt(n)))
