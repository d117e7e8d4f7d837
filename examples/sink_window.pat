# A sliding window that always keeps the first tokens (attention sinks, as in
# StreamingLLM), written with a custom `where` rule for the band.
pattern sink_window(w = 512, g = 4) = causal & ((where q - k < w) | sink(g))
