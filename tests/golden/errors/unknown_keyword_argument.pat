strided(w = 64)
