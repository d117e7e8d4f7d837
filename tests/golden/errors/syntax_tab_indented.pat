pattern p =
	causal &
		& local(3)
