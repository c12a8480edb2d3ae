"""User models for the `package.module:factory` path, including ones that must fail."""

import torch
from torch import nn

from toolkit import Dim, ModelSpec, TensorSpec


class Scaler(nn.Module):
    """Two inputs, two outputs, a dynamic batch and length."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.tanh(self.proj(values))  # (B, T, 4)
        return hidden * weights[..., None], hidden.sum(dim=1)


def build() -> ModelSpec:
    torch.manual_seed(0)
    return ModelSpec(
        module=Scaler(),
        inputs=[TensorSpec("values", "float32", ("batch", "length", 6)), TensorSpec("weights", "float32", ("batch", "length"))],
        outputs=["scaled", "pooled"],
        dims=[Dim("batch", export=2, check=(1, 3)), Dim("length", export=5, check=(4, 9))],
        task="embed",
    )


class FixedPositions(nn.Module):
    """Declares `seq` dynamic, but its learned positions only fit sequences of exactly 16."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos


def _over_sequences(module: nn.Module, seq: Dim) -> ModelSpec:
    """x (batch, seq, 8) → y: the shape the dim-fixing cases share."""
    return ModelSpec(module=module, inputs=[TensorSpec("x", "float32", ("batch", "seq", 8))], outputs=["y"],
                     dims=[Dim("batch", export=2, check=(1, 3)), seq], task="embed")


def baked() -> ModelSpec:
    torch.manual_seed(0)
    return _over_sequences(FixedPositions(), Dim("seq", export=16, check=(16, 9)))


@torch.library.custom_op("userpkg::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Mysterious(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(x) + 1


def unexportable() -> ModelSpec:
    return ModelSpec(
        module=Mysterious(),
        inputs=[TensorSpec("x", "float32", ("batch", 4))],
        outputs=["y"],
        dims=[Dim("batch")],
        task="regress",
    )


def not_a_spec() -> nn.Module:
    return Mysterious()


class Flatten(nn.Module):
    """Works at any length in PyTorch, but `int(...)` turns the length into a constant when traced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = int(x.shape[1])
        return x.reshape(x.shape[0], length * 8)


def traced_constant() -> ModelSpec:
    return _over_sequences(Flatten(), Dim("seq", export=6, check=(6, 11)))


class OutlierClassifier(nn.Module):
    """Decides on four small features that sit beside one feature a thousand times larger. An int8
    activation with one scale per tensor rounds the small features away, so the model's int8
    variants fail their top-1 gate by construction, whatever the quantizer's version; kept in fp32,
    the one MatMul is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([1000.0, 1.0, 1.0, 1.0, 1.0]))
        self.head = nn.Linear(5, 4)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([torch.zeros(4, 1), torch.eye(4)], dim=1))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x * self.scale)


def outliers() -> ModelSpec:
    return ModelSpec(
        module=OutlierClassifier(),
        inputs=[TensorSpec("x", "float32", ("batch", 5))],
        outputs=["logits"],
        dims=[Dim("batch", export=2, check=(1, 3))],
        task="classify",
    )


class Convolutions(nn.Module):
    """Only convolutions: nothing that dynamic int8 quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


def convolutions() -> ModelSpec:
    torch.manual_seed(0)
    images = torch.rand(76, 3, 12, 12, generator=torch.Generator().manual_seed(1)).numpy()
    return ModelSpec(module=Convolutions(), inputs=[TensorSpec("x", "float32", ("batch", 3, 12, 12))], outputs=["scores"],
                     dims=[Dim("batch", export=2, check=(1, 3))], task="classify",
                     sample_data=lambda: {"x": images[12:]},
                     calibration_data=lambda n: {"x": images[:12][:n]})  # 12 rows, however many are asked for


def named() -> ModelSpec:
    """The factory names its bundle itself."""
    import dataclasses

    return dataclasses.replace(build(), name="scaler")


def chatty() -> ModelSpec:
    """A factory whose library logs what it does, through a handler of its own."""
    import logging
    import sys

    log = logging.getLogger("userpkg.weights")
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.INFO)
    log.info("chatty: loading weights from the checkpoint")
    return build()


class Mixer(nn.Module):
    """A layer type of its own: a matrix it multiplies by, which toolkit prune does not know."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.randn(width, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.matrix)


def mixers() -> ModelSpec:
    torch.manual_seed(0)
    return _over_sequences(nn.Sequential(Mixer(8), Mixer(8)), Dim("seq", export=4, check=(3, 5)))


class TorchEncoder(nn.Module):
    """torch's own nn.TransformerEncoder (nn.MultiheadAttention inside), as users write classifiers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def torch_encoder() -> ModelSpec:
    torch.manual_seed(0)
    return ModelSpec(module=TorchEncoder().eval(), inputs=[TensorSpec("ids", "int64", ("batch", "seq"), kind="ids", high=100)],
                     outputs=["logits"], dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", export=8, check=(4, 9))], task="classify")


class MaskedPooling(nn.Module):
    """Attention pooling over right-padded sequences, the padding masked by adding finfo.min to its
    scores as transformers does. The sum's calibrated range runs from -3.4e38 to a few units: in 8
    bits, every real score rounds to 0 and the pooling becomes a plain mean."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bias = torch.where(mask.bool(), 0.0, torch.finfo(torch.float32).min)
        weights = torch.softmax(self.score(x).squeeze(-1) + bias, dim=-1)
        return self.head(torch.bmm(weights.unsqueeze(1), x).squeeze(1))  # a MatMul: int8 from the scores to the head


def masked_pooling() -> ModelSpec:
    import numpy as np

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((224, 6, 8)).astype(np.float32)
    mask = (np.arange(6) < rng.integers(2, 7, size=(224, 1))).astype(np.int64)  # padded, as a calibration set of sentences is
    return ModelSpec(module=MaskedPooling().eval(), outputs=["scores"], task="regress",
                     inputs=[TensorSpec("x", "float32", ("batch", "seq", 8)), TensorSpec("mask", "int64", ("batch", "seq"), kind="mask")],
                     dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", export=6, check=(4, 6))],
                     sample_data=lambda: {"x": x[96:], "mask": mask[96:]}, calibration_data=lambda n: {"x": x[:96][:n], "mask": mask[:96][:n]})


class OutlierChannels(nn.Module):
    """A transformer's feed-forward block with the activation outliers trained BERTs have: a layer
    norm whose gain makes two of its channels 300× the rest, and a GELU output with a few channels far
    above the others. Quantized with one activation scale per tensor, the other channels round to a
    few levels."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 128)
        self.down = nn.Linear(128, 16)
        with torch.no_grad():
            self.norm.weight[:2] = 300.0
            self.up.weight[:, :2] /= 300.0  # as trained: the large channels carry no more than the others
            self.up.bias[:3] = 150.0
            self.down.weight[:, :3] /= 150.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(self.norm(x))))


def outlier_channels() -> ModelSpec:
    import numpy as np

    x = np.random.default_rng(2).standard_normal((256, 8, 32)).astype(np.float32)
    return ModelSpec(module=OutlierChannels().eval(), outputs=["y"], task="regress",
                     inputs=[TensorSpec("x", "float32", ("batch", "seq", 32))],
                     dims=[Dim("batch", export=2, check=(1, 3)), Dim("seq", export=8, check=(4, 8))],
                     sample_data=lambda: {"x": x[128:]}, calibration_data=lambda n: {"x": x[:128][:n]})


class DensePrediction(nn.Module):
    """A convolution writes the output, a value per pixel (a box regressor's or a segmenter's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def dense_prediction() -> ModelSpec:
    """Calibrated on images whose red is dimmer than the held-out ones', as a calibration set never
    covers all: the input's range is the same (green and blue span it), the output's is not."""
    torch.manual_seed(0)
    images = torch.rand(76, 3, 12, 12, generator=torch.Generator().manual_seed(1)).numpy()
    dim = images[:12].copy()
    dim[:, 0] *= 0.3
    return ModelSpec(module=DensePrediction().eval(), inputs=[TensorSpec("x", "float32", ("batch", 3, 12, 12))], outputs=["y"],
                     dims=[Dim("batch", export=2, check=(1, 3))], task="regress",
                     sample_data=lambda: {"x": images[12:]}, calibration_data=lambda n: {"x": dim[:n]})
