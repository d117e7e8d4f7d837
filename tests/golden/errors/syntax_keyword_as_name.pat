pattern where = causal
