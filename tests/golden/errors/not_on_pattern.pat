not causal
