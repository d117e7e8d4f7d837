local(-3)
