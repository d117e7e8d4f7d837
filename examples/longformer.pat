# Longformer (Beltagy et al. 2020): a bidirectional band plus global tokens.
pattern longformer(w = 512, g = 64) = local(w) | global(g)
