# Different patterns for different heads of a 16-head attention.
pattern heads_split(w = 256, l = 128) = heads {
    0..8  => causal & local(w),
    8..16 => causal & (local(l) | stride(l)),
}
