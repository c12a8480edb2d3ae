"""Parity tolerance profiles, one per precision: the single place where they live.

An output passes when max|onnx - torch| <= atol + rel * scale, with scale = max|torch| for that
output (the error is judged relative to the output's own magnitude). A profile whose `rel` is None
(int8: calibrated ranges make errors on arbitrary inputs meaningless) reports element errors but is
judged by task metrics on held-out inputs instead:

- classify: accuracy drop on the labelled eval set (all profiles) and top-1 agreement with the
  reference (`min_top1_agreement`);
- generate: next-token (argmax) agreement with the reference, reported; greedy continuation of a
  left-padded batch of prompts, where a variant judged elementwise may choose another token than
  the reference only at a near-tie (a lead in the logits that two logits each off by the tolerance
  could overturn), and an int8 variant's agreement is reported;
- embed: per-row cosine similarity with the reference (`min_cosine`);
- regress: max error relative to the output scale (`max_score_rel`).

The profile `pruned` judges a pruned model against its unpruned reference by the same task
metrics (next-token agreement is a gate there: `min_next_token_agreement`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["Tolerance", "PROFILES", "localize_tolerance", "profile"]


@dataclass(frozen=True)
class Tolerance:
    precision: str
    rel: float | None
    atol: float
    max_accuracy_drop: float
    min_top1_agreement: float | None = None
    min_cosine: float | None = None
    max_score_rel: float | None = None
    min_next_token_agreement: float | None = None

    def allows(self, max_abs_err: float, scale: float) -> bool:
        return self.rel is None or max_abs_err <= self.atol + self.rel * scale

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PROFILES = {
    t.precision: t
    for t in (
        Tolerance("fp32", rel=1e-4, atol=1e-5, max_accuracy_drop=0.005),
        Tolerance("fp16", rel=1e-2, atol=1e-3, max_accuracy_drop=0.01),
        Tolerance("int8", rel=None, atol=0.0, max_accuracy_drop=0.01, min_top1_agreement=0.99, min_cosine=0.99, max_score_rel=0.05),
        # int4 weights are judged as int8 ones are: by the task, with the same bars.
        Tolerance("int4", rel=None, atol=0.0, max_accuracy_drop=0.01, min_top1_agreement=0.99, min_cosine=0.99, max_score_rel=0.05),
        # A pruned model against the unpruned one (toolkit prune): a smaller model, which may lose a
        # little of the task; its own graph is judged against the pruned PyTorch model by fp32's bars.
        Tolerance("pruned", rel=None, atol=0.0, max_accuracy_drop=0.02, min_top1_agreement=0.95, min_cosine=0.95,
                  max_score_rel=0.1, min_next_token_agreement=0.9),
    )
}


def profile(precision: str) -> Tolerance:
    try:
        return PROFILES[precision]
    except KeyError:
        raise ToolkitError(f"no tolerance profile for precision {precision!r}; known: {', '.join(PROFILES)}.") from None


# Localizing a variant's error (toolkit.compile.localize): the error relative to its own scale past
# which an intermediate tensor departs. fp32 and fp16 use their output tolerance; int8, which has
# none, 5%: one int8 rounding of a tensor is 0.4% of its range, so 5% is an order of magnitude more
# than a quantized layer's own rounding explains.
_LOCALIZE_INT8_REL = 0.05


def localize_tolerance(precision: str) -> float:
    tolerance = profile(precision)
    return tolerance.rel if tolerance.rel is not None else _LOCALIZE_INT8_REL
