pattern local(w) = causal
