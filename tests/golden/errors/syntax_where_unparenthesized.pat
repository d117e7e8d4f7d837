causal & where k % 2 == 0
