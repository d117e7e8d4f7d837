pattern span(w) = causal & local(w)
pattern main = span(8) | span(0)
