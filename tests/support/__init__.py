"""What the tests share: the tiny model and tokens, SAE builders and the dense reference, the local Hub server, and
what each rank of a multi-process test runs."""
