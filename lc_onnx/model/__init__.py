"""The base layer: reading, writing, running and measuring ONNX models.

`files` (paths, atomic writes, external data kept inside the model's folder), `wire` (the protobuf wire
format read without parsing whole models), `io` (load, save, the data-free skeleton, constant reads),
`runtime` (the one onnxruntime session factory), `shapes` (shape inference, onnxruntime's contrib ops
included), `macs` (parameter and multiply-accumulate counts), `demo` (the embedded demo model).
Nothing here knows about sites or collapses.
"""
