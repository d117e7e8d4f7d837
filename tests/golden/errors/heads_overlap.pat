heads { 0..8 => causal, 6..16 => local(3) }
