summary(l = 8, 2)
