# The Sparse Transformer's strided pattern (Child et al. 2019, fig. 3b):
# each query sees the previous l positions (itself included) and every l-th
# position before that. The local band holds l keys, as OpenAI's code does.
pattern strided(l = 128) = causal & (local(l) | stride(l))
