local(8 // (2 - 2))
