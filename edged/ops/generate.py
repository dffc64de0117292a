"""``generate``: stream text from a language model.

The request type is the runners' own (``models/calls.py``): the service queues it on the
model, whose runner does the rest.
"""

from edged.models.calls import Generate
from edged.opunit import Op
from edged.service import InferenceService

OP = Op("generate", Generate, InferenceService.submit)
