causal local(3)
