pattern a = causal pattern b = local(3)
