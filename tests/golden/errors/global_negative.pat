causal | global(2 - 5)
