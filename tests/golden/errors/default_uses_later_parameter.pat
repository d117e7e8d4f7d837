pattern p(a = b + 1, b = 2) = dilated(a, b)
