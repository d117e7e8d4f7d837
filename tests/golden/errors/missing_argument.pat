summary(8)
