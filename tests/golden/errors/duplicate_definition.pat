pattern p = causal
pattern p = local(3)
