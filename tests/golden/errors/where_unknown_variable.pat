where q - j < 8
