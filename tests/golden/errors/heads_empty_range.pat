heads { 0..8 => causal, 8..8 => local(3) }
