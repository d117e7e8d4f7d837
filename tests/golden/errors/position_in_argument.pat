local(q - k)
