"""The OpenAI-compatible HTTP endpoint (the ``http`` extra), served on the daemon's own event
loop: each HTTP request becomes a ``generate``, ``chat`` or ``embed`` request submitted to the
inference service, its replies handed over in process (docs/HTTP.md).

Only ``binding`` may be imported by a daemon that has no ``[http] listen``: the modules that
serve (``server``, ``routes``, ``sse``) import aiohttp, which such a daemon never loads.
"""
