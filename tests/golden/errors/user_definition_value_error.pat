pattern band(w) = causal & local(w)
pattern main = band(8) | band(0)
