"""``infer``: run an ONNX model on the request's input tensors.

The request type is the runners' own (``models/calls.py``): the service queues it on the
model, whose runner does the rest.
"""

from edged.models.calls import Infer
from edged.opunit import Op
from edged.service import InferenceService

OP = Op("infer", Infer, InferenceService.submit)
