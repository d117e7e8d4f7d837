where (q - k) // 0 > 1
