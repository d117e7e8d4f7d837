causal & local
