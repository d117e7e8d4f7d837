# The standard library: available by name in every pattern source.
#
# Parsed by the same front end as user code. A user definition with the same
# name takes its place in that source (examples/strided.pat defines its own
# `strided`); primitives (`causal`, `local`, ...) cannot be redefined.
#
# Defaults are the common published settings, so `strided` alone means
# something useful; pass arguments to choose your own.

# Sparse Transformer, strided (Child et al. 2019, fig. 3b): the previous l
# positions, the query included, and every l-th position before them.
pattern strided(l = 128) = causal & (local(l) | stride(l))

# Sparse Transformer, fixed (fig. 3c): the query's own block of l positions and
# the last c positions ("summary cells") of every block; c defaults to l / 4.
pattern fixed(l = 128, c = l // 4) = causal & (block(l) | summary(l, c))

# Causal sliding window: the query and the w - 1 positions before it.
pattern sliding_window(w = 256) = causal & local(w)

# Llama 4's chunked attention: the sequence cut into chunks of l tokens, each
# query attending causally within its own chunk only (Meta's default l = 8192).
pattern chunked(l = 8192) = causal & block(l)

# A causal band plus g global tokens.
pattern local_global(w = 256, g = 32) = causal & (local(w) | global(g))

# Longformer (Beltagy et al. 2020): a bidirectional band plus global tokens.
pattern longformer(w = 256, g = 32) = local(w) | global(g)

# BigBird (Zaheer et al. 2020): a band, global tokens and r random key blocks
# of size b for every query block (seeded, see patterncc/randomblocks.py).
pattern bigbird(w = 192, g = 64, r = 3, b = 64, seed = 0) = local(w) | global(g) | random(r, b, seed)

# Axial attention over an image flattened row by row: the earlier pixels of
# the query's row and of its column. The default width assumes a square image.
pattern axial(width = isqrt(n)) = causal & (block(width) | stride(width))
