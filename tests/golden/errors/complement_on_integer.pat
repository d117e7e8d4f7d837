local(~3)
