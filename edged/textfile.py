"""The daemon's metrics as a file for node_exporter's textfile collector: how a fleet that
already runs node_exporter on its devices gets edged's metrics with the host's, through one
scrape or one agent's remote write that buffers while the device is offline
(docs/OPERATIONS.md#fleet-telemetry).

node_exporter refuses a textfile metric that collides with one of its own, and it exports its
own ``process_*`` metrics: the daemon's are renamed ``edged_process_*``. ``edged_up`` says
whether the daemon answered: a file written while it was down holds that alone, rather than the
last figures, which would look current. The file is replaced in one step
(``edged.store.write_durably``: its temporary name does not end in .prom), so the collector never
reads half of one.
"""

from __future__ import annotations

import re

#: the families node_exporter exports under the same names
_COLLIDING = re.compile(r"^(# (?:HELP|TYPE) )?(process_)", re.MULTILINE)
UP = "# HELP edged_up 1 when the daemon answered for this file, else 0\n# TYPE edged_up gauge\n"


def textfile(exposition: str | None) -> str:
    """The file's contents: the daemon's exposition (``None``: it did not answer), renamed
    where node_exporter's own metrics would collide, and ``edged_up``."""
    if exposition is None:
        return f"{UP}edged_up 0\n"
    renamed = _COLLIDING.sub(r"\1edged_\2", exposition)
    return f"{renamed.rstrip()}\n{UP}edged_up 1\n"
