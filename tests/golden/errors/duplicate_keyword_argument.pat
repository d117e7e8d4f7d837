summary(l = 8, l = 4)
