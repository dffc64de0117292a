"""Giving memory back after a burst of traffic, from the daemon's tick.

A flood of large or many-framed messages makes libzmq's I/O thread and Python allocate
hundreds of MiB of small buffers; once they are answered the buffers are free, but glibc keeps
the pages in its arenas, so the daemon's RSS stayed near its peak for good (measured: 78 MiB
at rest, 1.2 GiB after 400 messages of 10 000 frames, still 1.15 GiB once they were answered).
``malloc_trim`` hands free pages back from every arena, the middle of the heap included
(78 -> 80 MiB in the same run). It walks the heap, so it runs only when the resident size has
grown well past what it was after the last trim, and on a thread of its own, off the event loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

from edged.models.budget import MIB, give_back_freed_memory
from edged.models.loading import in_fresh_thread

log = logging.getLogger(__name__)

#: growth over the resident size after the last trim that is worth a trim
TRIM_GROWTH_BYTES = 32 * MIB
#: a trim that gave back more than the growth / this is followed by another on the next tick
AGAIN_FRACTION = 8


@dataclass(frozen=True)
class HeapStatistics:
    trims: int
    #: bytes the trims gave back, all together
    returned_bytes: int


class HeapTrimmer:
    def __init__(self, growth_bytes: int = TRIM_GROWTH_BYTES) -> None:
        self._process = psutil.Process()
        self._growth = growth_bytes
        self._baseline = self._rss()
        self._again = False
        self._trims = 0
        self._returned = 0

    async def tick(self) -> None:
        """Trim when the resident size grew by ``growth_bytes`` since the last trim (a model
        load grows it too, and costs one trim that finds little to give back), and again on
        the next tick while trims still give much back: one that did ran during a burst, and
        the burst's last buffers were freed after it."""
        before = self._rss()
        if not self._again and before - self._baseline < self._growth:
            self._baseline = min(self._baseline, before)
            return
        await in_fresh_thread(give_back_freed_memory)
        after = self._rss()
        returned = max(0, before - after)
        self._trims += 1
        self._returned += returned
        self._baseline = after
        self._again = returned >= self._growth // AGAIN_FRACTION
        if returned >= self._growth:
            log.info("gave %.0f MiB of freed memory back to the system", returned / MIB)

    def statistics(self) -> HeapStatistics:
        return HeapStatistics(self._trims, self._returned)

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)
