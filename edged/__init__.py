"""edged: an edge-device inference daemon.

Layout: ``protocol`` (wire format, pure) -> ``server`` (ZeroMQ endpoint) -> ``service`` (ops) ->
``models`` (registry, runner, batching, backends); ``daemon`` owns the lifecycle, ``config`` and
``paths`` say what and where, ``client`` is what sensor processes import, ``cli`` maps commands.
"""

__version__ = "0.1.0"
