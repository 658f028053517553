"""Parley's shared kernel: event schemas, their codec and upcasters, and the log's layout in Redis."""
