causal | 3
