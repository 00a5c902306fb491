"""Small readings of ONNX protos that every layer needs: operator domains and the dims of a value.

An unknown dim is `None` here; each caller maps it to what it needs in one named place (onnxruntime
feeds use `runtime.DEFAULT_DYNAMIC_DIM`, Triton configs `-1`, shape inference of concrete inputs `1`).
"""

from __future__ import annotations

import onnx

__all__ = ["DEFAULT_DOMAINS", "MS_DOMAIN", "dims_of", "is_default_domain"]

DEFAULT_DOMAINS = ("", "ai.onnx")
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators


def is_default_domain(domain: str | None) -> bool:
    """True for the standard ONNX operator set, however the domain is spelled."""
    return (domain or "") in DEFAULT_DOMAINS


def dims_of(
    value: onnx.ValueInfoProto | onnx.TypeProto, *, symbolic: bool = False
) -> list[int | str | None] | None:
    """The dims of a tensor value, or None when it has no tensor type or no shape.

    A dim is its `dim_value`, or `None` when unknown: a `dim_param`, no value at all, or a negative value
    (some exporters write -1 for a dynamic batch, and onnxruntime treats it as dynamic). With `symbolic`,
    a named dim is returned as its name instead of `None`.
    """
    value_type = value.type if isinstance(value, onnx.ValueInfoProto) else value
    if not value_type.HasField("tensor_type") or not value_type.tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for d in value_type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            dims.append(d.dim_value)
        else:
            dims.append(d.dim_param or None if symbolic else None)
    return dims
