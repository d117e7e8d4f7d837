causal & local(3))
