where q - k
