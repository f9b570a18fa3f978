"""``deepseek-ocr``: the batch command (files, folders, globs, PDFs -> markdown + blocks).

A thin front end over the same pieces the server uses: settings (``config.py``), assets, the
continuous-batching engine (``engine/``) and the document pipeline (``documents/``).

- :mod:`.cli` -- flags (the server's model/vision/decoding flags plus the batch ones), exit status;
- :mod:`.inputs` -- INPUT arguments -> documents and their output names;
- :mod:`.runner` -- pages through the engine, resume, failures, Ctrl-C;
- :mod:`.engines` -- in-process engine or ``--server`` over HTTP;
- :mod:`.outputs` -- output files, the up-to-date check, atomic writes;
- :mod:`.progress` -- the tqdm bar / plain lines.
"""
