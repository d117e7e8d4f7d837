heads { -2..8 => causal }
