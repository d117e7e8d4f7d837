# A causal band plus g global tokens that see and are seen by everything before them.
pattern local_global(w = 512, g = 64) = causal & (local(w) | global(g))
