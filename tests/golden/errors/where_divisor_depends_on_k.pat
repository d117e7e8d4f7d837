causal & (where q % k == 0)
