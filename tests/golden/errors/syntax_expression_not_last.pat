causal
pattern p = local(3)
