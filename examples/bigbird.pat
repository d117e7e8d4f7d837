# BigBird (Zaheer et al. 2020): a band, global tokens and r random key blocks
# of size b for every query block, drawn by a seeded generator.
pattern bigbird(w = 192, g = 64, r = 3, b = 128, seed = 0) =
    local(w) | global(g) | random(r, b, seed)
