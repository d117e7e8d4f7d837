heads { 0..8 causal }
