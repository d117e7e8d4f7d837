causal & (q < k)
