pattern p(w = 3) = w(2)
