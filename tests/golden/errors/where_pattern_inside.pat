where causal and q < k
