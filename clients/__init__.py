"""Clients of the pipeline: a library and the `classify` command line."""
