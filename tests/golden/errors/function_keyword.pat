local(abs(x = 3))
