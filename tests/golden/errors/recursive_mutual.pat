pattern even = causal | odd
pattern odd = local(3) & even
even
