pattern p(l = 8) = causal & (local(l) | stride(l)
