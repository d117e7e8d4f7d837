pattern band(w) = causal & local(w)
