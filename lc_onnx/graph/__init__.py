"""The graph pass: find Linear -> activation -> Linear sites in an ONNX graph, decide, collapse, verify.

The flow, one module per step: `sites` (read-only matches) -> `decide` (collapse or skip, with a reason
from `reasons`) -> `algebra` (pure float64 numpy) -> `rewrite` (the graph edit) -> `verify` (onnxruntime,
original against fused) -> `report`. `activations` recognises activation spellings, `constant_eval` evaluates
constant tensors, and `pipeline.fuse` runs the steps in order. Never imports calibration.
"""
