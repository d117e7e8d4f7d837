!causal
