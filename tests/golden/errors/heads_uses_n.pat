heads { 0..n => causal }
