stride(causal)
