local("3")
