pattern p(d = -2) = where (q - k) % d == 0
