"""Rule: an initial state of LSTM, GRU or RNN that is provably all zeros is dropped.

torch's exporter writes, for a stacked `nn.LSTM`, a zero initial state expanded to the batch size and
sliced per layer; onnxruntime keeps it because the batch is dynamic. The operator's own default is
zeros, so the input can go: the state is traced through value-preserving ops back to a constant.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit.compile.passes._graph import constants

__all__ = ["drop_zero_initial_states"]

# Initial-state inputs, by (domain, operator): LSTM's initial_h and initial_c, GRU's and RNN's initial_h.
_STATE_INPUTS = {("", "LSTM"): (5, 6), ("com.microsoft", "DynamicQuantizeLSTM"): (5, 6), ("", "GRU"): (5,), ("", "RNN"): (5,)}
# Operators that pass their first input's values through, rearranged or repeated: zeros stay zeros.
_VALUE_PRESERVING = {"Expand", "Slice", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Cast", "Tile"}


def drop_zero_initial_states(proto: Any) -> int:
    """Empties every provably-zero initial-state input, in place; returns how many."""
    graph = proto.graph
    known = constants(graph)
    producer = {out: node for node in graph.node for out in node.output}

    def is_zero(name: str) -> bool:
        while name not in known:
            node = producer.get(name)
            if node is None or node.op_type not in _VALUE_PRESERVING or node.domain not in ("", "ai.onnx"):
                return False
            name = node.input[0]
        return not np.any(known[name])

    dropped = 0
    for node in graph.node:
        for index in _STATE_INPUTS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type), ()):
            if index < len(node.input) and node.input[index] and is_zero(node.input[index]):
                node.input[index] = ""
                dropped += 1
    return dropped
