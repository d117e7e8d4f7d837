pattern p(w = 3) = causal & w
