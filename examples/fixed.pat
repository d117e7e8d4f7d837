# The Sparse Transformer's fixed pattern (fig. 3c): a query sees its own
# block of l positions and the last c positions ("summary cells") of every block.
pattern fixed(l = 128, c = 32) = causal & (block(l) | summary(l, c))
