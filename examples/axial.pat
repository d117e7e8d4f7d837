# Axial attention over an image of `width` columns, flattened row by row:
# a pixel sees the earlier pixels of its row and of its column.
pattern axial(width = 64) = causal & (block(width) | stride(width))
