summary(8,, 2)
