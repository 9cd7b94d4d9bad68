"""The `loratrain` command line: the embedded stack, the services, and runs through `client`."""
