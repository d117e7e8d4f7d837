causal & (local(128) | stridd(128))
