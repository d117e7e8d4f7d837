pattern p(w = 3) =

# nothing here
