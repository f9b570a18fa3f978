"""Builders of random-weight checkpoints in the ORIGINAL layouts (tests and benchmarks).

Nothing here is used by the server at run time.
"""
