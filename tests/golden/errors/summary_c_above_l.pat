pattern p() = causal & summary(8, 9)
