"""Cluster mode on Ray Serve (the optional ``[ray]`` extra).

Nothing here is imported by the single-process server. The pieces:

- :mod:`.wire`: what travels between the ingress and the model replicas besides the engine's events
  (engine errors raised before the first event); no Ray import.
- :mod:`.metrics`: merging the replicas' Prometheus text into the ingress's ``/metrics``; no Ray import.
- :mod:`.backend`: the ingress side of the backend seam of :func:`..api.app.create_app`:
  ``submit`` forwards to the model's deployment through a streaming handle.
- :mod:`.deployments`: the Serve deployments (the ingress wrapping our FastAPI app, one model
  deployment per configured model id) and the application builders for ``serve run``/``serve deploy``.
- :mod:`.launch`: ``deepseek-ocr-server --ray [ADDRESS]``.
"""
