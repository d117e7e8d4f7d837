causal and local(3)
