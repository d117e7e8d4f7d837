# Causal sliding window: each query sees itself and the w - 1 keys before it.
pattern sliding_window(w = 1024) = causal & local(w)
