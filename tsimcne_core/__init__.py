"""The numpy core both sides stand on: the bundle format and its reading, the preprocessing contract, the one
placement pipeline and its record, neighbour search and the flag at run time. No torch, no BentoML."""
