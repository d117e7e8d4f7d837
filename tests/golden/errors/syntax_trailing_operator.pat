pattern p = causal &
