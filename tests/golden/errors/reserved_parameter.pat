pattern p(n = 3) = local(n)
