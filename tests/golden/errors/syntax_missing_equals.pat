pattern p(w) local(w)
