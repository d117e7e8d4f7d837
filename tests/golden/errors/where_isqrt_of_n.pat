pattern p(w = isqrt(n)) = where q - k < w
