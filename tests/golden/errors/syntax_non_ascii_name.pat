pattern fenêtre = causal
