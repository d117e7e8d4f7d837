local(3, 4)
