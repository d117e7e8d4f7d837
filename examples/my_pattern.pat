# A pattern of your own: a causal band of the last w keys, every `every`-th key
# column (tokens 0, every, 2 * every, ... act as summaries every query can read),
# and a dilated band that reaches w * d keys back at spacing d.
# Property-test it with `patterncc test examples/my_pattern.pat` or
# `pytest examples/test_my_pattern.py`.
pattern my_pattern(w = 32, every = 64, d = 8) =
    causal & (local(w) | (where k % every == 0) | dilated(w, d))
