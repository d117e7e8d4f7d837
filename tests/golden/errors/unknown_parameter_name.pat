pattern p(width = 8) = local(widht)
