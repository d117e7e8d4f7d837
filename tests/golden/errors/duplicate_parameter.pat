pattern p(w, w = 3) = local(w)
