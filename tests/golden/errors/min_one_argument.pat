where q < min(k)
