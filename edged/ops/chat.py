"""``chat``: stream a language model's reply to messages, formatted by its chat template.

The request type is the runners' own (``models/calls.py``): the service queues it on the
model, whose runner renders the messages with the template and streams as for ``generate``.
"""

from edged.models.calls import Chat
from edged.opunit import Op
from edged.service import InferenceService

OP = Op("chat", Chat, InferenceService.submit)
