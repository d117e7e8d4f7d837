# The paper's "multi-head" mode: heads alternate between the two factors of
# the strided pattern, so together they cover it.
pattern row(l = 128) = causal & local(l)
pattern column(l = 128) = causal & stride(l)
pattern multihead(l = 128) = cycle(row(l), column(l))
