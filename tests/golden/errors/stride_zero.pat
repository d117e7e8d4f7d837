stride(0)
