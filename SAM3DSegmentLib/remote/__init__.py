"""Remote inference: a GPU server that encodes regions, a client that decodes clicks locally (or remotely)."""
