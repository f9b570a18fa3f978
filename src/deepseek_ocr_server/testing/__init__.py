"""What tests and benchmarks need, kept out of the serving code.

- ``<family>.py``: builders of random-weight checkpoints in the ORIGINAL layouts (``build_tiny_checkpoint``
  for tests, ``build_full_checkpoint`` for benchmarks);
- ``fake.py``: a deterministic model that implements the protocol for real (the ``fake`` kind);
- ``probes.py``: measurements taken from outside a model (vision vs prefill time, the weight bytes a
  decode step reads);
- ``generation.py``: a static-batch generation loop.

Nothing here is used by the server at run time (except the fake model, for entries of kind ``fake``).
"""
