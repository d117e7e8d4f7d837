where q < k | causal
