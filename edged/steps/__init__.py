"""A model's pre- and post-processing as ONNX graphs, fused with the model into one session.

``frame`` turns a raw camera frame into the model's input, ``scores`` a classifier's logits
into its best classes, ``boxes`` a detector's raw rows into detections; ``pipeline`` joins them
with a model. Each step is a frozen dataclass that checks itself, so the config reads its
settings straight into one.
"""
