pattern p(w = 3) = local(w) | p(w + 1)
