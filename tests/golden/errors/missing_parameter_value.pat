pattern span(w) = causal & local(w)
