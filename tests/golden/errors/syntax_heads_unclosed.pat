heads {
  0..8 => causal,
  8..16 => local(3)
