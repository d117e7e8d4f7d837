local(isqrt(3 - 7))
