"""int8 weight-only quantization (models/quant.py) on small modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepseek_ocr_server.models.quant import Int8Linear, int8_weight_bytes, quantize_linears_int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_linear_matches_dequantized_reference(dtype, rows):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True).to(dtype)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(rows, 96, dtype=dtype)
    ref = nn.functional.linear(x.float(), q.weight.float() * q.scales[:, None], lin.bias.float())
    got = q(x)
    assert got.dtype == dtype and got.shape == (rows, 40)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    assert torch.allclose(got.float(), ref, atol=tol, rtol=0.02)
    # quantization error vs the original weights stays small
    err = (q.weight.float() * q.scales[:, None] - lin.weight.float()).abs().max()
    assert err <= lin.weight.float().abs().max() / 127 * 0.51 + 1e-6


def test_int8_linear_keeps_leading_dims_and_no_bias():
    lin = nn.Linear(32, 16, bias=False)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 3, 32)
    out = q(x)
    assert out.shape == (2, 3, 16) and q.bias is None
    assert torch.allclose(out, lin(x), atol=0.05)


def test_quantize_replaces_and_skips():
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)), nn.Embedding(4, 4)
    )
    shared = model[0]
    model.add_module("again", shared)
    n = quantize_linears_int8(model, skip=lambda name, lin: lin.out_features == 8)
    assert n == 2
    assert isinstance(model[0], Int8Linear) and model[0] is model.again
    assert isinstance(model[2][0], Int8Linear) and type(model[2][1]) is nn.Linear
    assert int8_weight_bytes(model) == 2 * 64 * 64 + 2 * 64 * 4


class ToyLM(nn.Module):
    """A small residual MLP language model: enough to check greedy agreement after quantization."""

    def __init__(self, vocab: int = 512, dim: int = 256, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            for _ in range(layers)
        )
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B, T] -> logits of the last position
        h = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]
        h = h[:, -1] + self.mix(h[:, -1])
        for blk in self.blocks:
            h = h + blk(h)
        return self.head(h)


def greedy(model: nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).argmax(-1)))
    return ids[len(prompt) :]


def test_greedy_agreement_on_toy_lm():
    torch.manual_seed(0)
    ref = ToyLM().to(torch.bfloat16)
    qm = ToyLM().to(torch.bfloat16)
    qm.load_state_dict(ref.state_dict())
    assert quantize_linears_int8(qm) == 10
    a, b = greedy(ref, [1, 2, 3], 64), greedy(qm, [1, 2, 3], 64)
    assert sum(x == y for x, y in zip(a, b, strict=True)) >= 0.9 * 64
