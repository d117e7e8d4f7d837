local(n / 2)
