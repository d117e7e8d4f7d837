pattern strided(l = 64) = strided(l) & causal
