"""Finding and collapsing MLP blocks, bottom to top.

`linear` (the three linear-layer spellings as affine maps), `roles` (what a module is in a block),
`dataflow` (one forward recorded as calls and tensors), `records` (blocks, refusals and the discovery
kept on a model), `discover` (blocks by data flow) and `structural` (by structure: timm `Mlp`,
`nn.Sequential`), `collapsible` (the API: finding, linearising, collapsing blocks), `export` (the ONNX
export the graph pass collapses) and `checkpoint` (partly collapsed models saved and rebuilt). Nothing
here trains.
"""
