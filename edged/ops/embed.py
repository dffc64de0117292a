"""``embed``: one embedding per text, from an embedding model.

The request type is the runners' own (``models/calls.py``): the service queues it on the
model, whose runner does the rest.
"""

from edged.models.calls import Embed
from edged.opunit import Op
from edged.service import InferenceService

OP = Op("embed", Embed, InferenceService.submit)
