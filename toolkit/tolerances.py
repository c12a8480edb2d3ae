"""Parity tolerance profiles, one per precision: the single place where they live.

An output passes when max|onnx - torch| <= atol + rel * scale, with scale = max|torch| for that
output (the error is judged relative to the output's own magnitude). Classifiers with a labelled
eval set also must not lose more than `max_accuracy_drop` of accuracy against the reference.
A profile whose `rel` is None reports element errors but is judged by task metrics only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["Tolerance", "PROFILES", "profile"]


@dataclass(frozen=True)
class Tolerance:
    precision: str
    rel: float | None
    atol: float
    max_accuracy_drop: float

    def allows(self, max_abs_err: float, scale: float) -> bool:
        return self.rel is None or max_abs_err <= self.atol + self.rel * scale

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PROFILES = {
    t.precision: t
    for t in (
        Tolerance("fp32", rel=1e-4, atol=1e-5, max_accuracy_drop=0.005),
        Tolerance("fp16", rel=1e-2, atol=1e-3, max_accuracy_drop=0.01),
        Tolerance("int8", rel=None, atol=0.0, max_accuracy_drop=0.01),
    )
}


def profile(precision: str) -> Tolerance:
    try:
        return PROFILES[precision]
    except KeyError:
        raise ToolkitError(f"no tolerance profile for precision {precision!r}; known: {', '.join(PROFILES)}.") from None
