where q = k
