pattern p = sliding_window(0) | sink(4)
