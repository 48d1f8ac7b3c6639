"""Every MedFed network trains with DP-SGD; networks Opacus cannot handle are refused."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy import start_dp_round
from common.config import CLASSIFIERS, ModelConfig, PrivacyConfig, TaskConfig
from common.models import BUILDERS, ModelError, build_model, make_dp_compatible
from tests.test_privacy_rounds import one_thread

__all__ = ["one_thread"]  # the autouse fixture, shared

PRIVACY = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, accountant="rdp")


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, segment: bool) -> int:
    """Start a DP round on ``(x, y)`` in batches of 2, train one batch, finish; returns steps.

    The steps include the noise-only steps of empty Poisson batches drawn before it.
    """
    dp = start_dp_round(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        loader=DataLoader(TensorDataset(x, y), batch_size=2), privacy=PRIVACY,
                        planned_epochs=1, round_epochs=1, history=None, ceiling_epsilon=None,
                        ledger=None)
    with dp:
        xb, yb = next(iter(dp.loader))
        dp.optimizer.zero_grad()
        out = dp.model(xb)
        loss = (nn.functional.cross_entropy(out, yb[:, 0]) if segment
                else nn.functional.cross_entropy(out, yb))
        loss.backward()
        dp.optimizer.step()
        report, _ = dp.finish()
    return report.steps


def sample(name: str, size: list[int]) -> tuple[nn.Module, torch.Tensor, torch.Tensor, bool]:
    segment = name not in CLASSIFIERS
    task = TaskConfig(kind="segmentation" if segment else "classification",
                      spatial_dims=len(size), image_size=size)
    width = [8, 16] if name in ("cnn", "unet", "attentionunet") else [8]
    model = build_model(task, ModelConfig(name=name, channels=width), seed=0)
    x = torch.randn(4, 1, *size)
    y = torch.randint(0, 2, (4, 1, *size)) if segment else torch.randint(0, 2, (4,))
    return model, x, y, segment


@pytest.mark.parametrize(("name", "size"), [*((n, [32, 32]) for n in sorted(BUILDERS)),
                                            ("unet", [16, 16, 16]), ("cnn", [16, 16, 16])])
def test_dp_sgd_trains_every_network(name: str, size: list[int]) -> None:
    model, x, y, segment = sample(name, size)
    keys = list(model.state_dict())
    before = [p.detach().clone() for p in model.parameters()]
    assert one_step(model, x, y, segment=segment) >= 1
    assert list(model.state_dict()) == keys  # unprefixed: the server's keys
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())  # unhooked


def batchnorm_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def test_batchnorm_is_refused_or_converted() -> None:
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 2, (4,))
    with pytest.raises(ModelError, match="BatchNorm.*make_dp_compatible"):
        one_step(batchnorm_net(), x, y, segment=False)
    fixed = make_dp_compatible(batchnorm_net())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert ModuleValidator.validate(fixed, strict=False) == []
    assert one_step(fixed, x, y, segment=False) >= 1


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x.flatten(1).unsqueeze(1))[0][:, -1])


class _InPlaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        out = self.body(x)
        out += x  # in place on a hooked module's output: breaks per-sample gradients
        return self.head(out)


@pytest.mark.parametrize(("net", "reason"), [(_Recurrent, "LSTM"), (_InPlaceResidual, "inplace")])
def test_a_network_opacus_cannot_handle_is_refused_clearly(net: type[nn.Module],
                                                           reason: str) -> None:
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ModelError, match=f"{net.__name__} cannot be trained with DP-SGD.*{reason}"):
        one_step(model, torch.randn(4, 1, 2, 4), torch.randint(0, 2, (4,)), segment=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
