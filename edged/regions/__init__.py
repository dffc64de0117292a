"""Shared-memory regions: tensors that a client hands the daemon without sending them.

A client makes a sealed memfd, hands it over on regions.sock (``listener``) and names places
in it in ``infer`` requests; the daemon reads inputs from the mapping without a copy and writes
outputs into it (``table``). docs/PROTOCOL.md §11 is the spec.
"""

from edged.regions.listener import RegionListener
from edged.regions.table import RegionStatistics, RegionTable

__all__ = ["RegionListener", "RegionStatistics", "RegionTable"]
