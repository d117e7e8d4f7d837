causal(1)
