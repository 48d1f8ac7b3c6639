"""Every DP-SGD grad-sample mode clips exactly; chunked Poisson batches account exactly."""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp_round import dp_train_round
from client.dp_sgd import PerSampleLoss, make_private, poisson_loader, resolve_grad_sample_mode
from client.prelu_grad_sample import prelu_grad_sample
from client.privacy_ledger import PrivacyLedger
from common.config import ConfigError, ModelConfig, PrivacyConfig, TaskConfig
from common.models import build_model
from common.training import make_loss

CLS = TaskConfig(kind="classification", image_size=[16, 16])
SEG = TaskConfig(kind="segmentation", image_size=[16, 16])
CLIP = 0.05  # small enough that every sample's gradient is clipped


def _batch(task: TaskConfig, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 16, 16, generator=gen)
    if task.kind == "classification":
        return x, torch.randint(0, 2, (n,), generator=gen)
    return x, (x > 0.3).long()


def _reference_update(net: nn.Module, task: TaskConfig, x: torch.Tensor, y: torch.Tensor,
                      expected_batch: int) -> list[torch.Tensor]:
    """sum_i clip(g_i) / expected_batch, one sample at a time (no Opacus)."""
    criterion = make_loss(task)
    total = [torch.zeros_like(p) for p in net.parameters()]
    for i in range(len(x)):
        net.zero_grad()
        criterion(net(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad.detach().clone() for p in net.parameters()]  # type: ignore[union-attr]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))  # type: ignore[arg-type]
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    net.zero_grad()
    return [t / expected_batch for t in total]


def _dp_update(net: nn.Module, task: TaskConfig, mode: str, x: torch.Tensor,
               y: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """The noise-free DP-SGD update of one step on (x, y) in ``mode``; expected batch size."""
    before = [p.detach().clone() for p in net.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x) // 2)
    dp = make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
                      loader=poisson_loader(loader), noise_multiplier=0.0, max_grad_norm=CLIP,
                      accountant="rdp", grad_sample_mode=mode, criterion=PerSampleLoss(task))
    criterion = dp.criterion or make_loss(task)
    dp.optimizer.zero_grad(set_to_none=True)
    criterion(dp.model(x), y).backward()
    dp.optimizer.step()
    dp.finish()
    update = [b - p.detach() for b, p in zip(before, net.parameters(), strict=True)]
    with torch.no_grad():
        for p, b in zip(net.parameters(), before, strict=True):
            p.copy_(b)
    return update, dp.optimizer.expected_batch_size  # type: ignore[attr-defined]


CASES = [
    (CLS, ModelConfig(name="cnn", channels=[4, 8]),
     ("output_hooks", "hooks", "functorch", "ghost")),
    (CLS, ModelConfig(name="cnn", channels=[4, 8], act="relu"),
     ("output_hooks", "hooks", "functorch", "ghost", "ew")),
    # (the default U-Net's transposed convolutions take functorch in both hook modes)
    (SEG, ModelConfig(name="unet", channels=[4, 8]),
     ("output_hooks", "hooks", "functorch", "ghost")),
    # (PyTorch's expanded weights fail on MONAI's UNet: a non-contiguous view)
    (SEG, ModelConfig(name="unet", channels=[4, 8], act="relu", upsample="resize"),
     ("output_hooks", "hooks", "functorch", "ghost")),
]


@pytest.mark.parametrize(("task", "model", "modes"), CASES,
                         ids=["cnn", "cnn-relu", "unet", "unet-relu-resize"])
def test_every_mode_gives_the_exact_clipped_update(task: TaskConfig, model: ModelConfig,
                                                   modes: tuple[str, ...]) -> None:
    net = build_model(task, model, seed=0)
    x, y = _batch(task)
    for mode in modes:
        update, expected_batch = _dp_update(net, task, mode, x, y)
        reference = _reference_update(net, task, x, y, expected_batch)
        for got, want in zip(update, reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=mode)


@pytest.mark.parametrize("task", [CLS, SEG], ids=["classification", "segmentation"])
def test_per_sample_loss_means_to_the_training_loss(task: TaskConfig) -> None:
    x, y = _batch(task)
    logits = torch.randn(len(x), 2, *([16, 16] if task.kind == "segmentation" else []))
    weights = torch.tensor([0.3, 1.7]) if task.kind == "classification" else None
    loss = PerSampleLoss(task, weights)
    assert loss(logits, y).item() == pytest.approx(make_loss(task, weights)(logits, y).item(),
                                                   rel=1e-6)
    loss.reduction = "none"
    assert loss(logits, y).shape == (len(x),)


def test_ghost_needs_a_per_sample_loss() -> None:
    net = build_model(CLS, ModelConfig(name="cnn", channels=[4, 8]), seed=0)
    x, y = _batch(CLS)
    with pytest.raises(ValueError, match="PerSampleLoss"):
        make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                     loader=poisson_loader(DataLoader(TensorDataset(x, y), batch_size=3)),
                     noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp",
                     grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss())


def test_auto_resolves_to_the_fastest_measured_mode() -> None:
    for model in (ModelConfig(name="cnn", channels=[4, 8]),
                  ModelConfig(name="cnn", channels=[4, 8], act="relu")):
        net = build_model(CLS, model, seed=0)
        assert resolve_grad_sample_mode("auto", net) == "output_hooks"
        assert resolve_grad_sample_mode("ghost", net) == "ghost"


@pytest.mark.parametrize("mode", ["output_hooks", "hooks", "ghost"])
def test_physical_chunks_take_one_accounted_step_per_logical_batch(mode: str,
                                                                   tmp_path: Path) -> None:
    n, batch, chunk = 64, 16, 3
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(n, 1, 16, 16, generator=gen),
                                      torch.randint(0, 2, (n,), generator=gen)),
                        batch_size=batch)
    net = build_model(CLS, ModelConfig(name="cnn", channels=[4, 8]), seed=0)
    sizes: list[int] = []
    net.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    privacy = PrivacyConfig(mode="dp_sgd", noise_multiplier=1.0, grad_sample_mode=mode,
                            max_physical_batch=chunk, accountant="rdp")
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    report = dp_train_round(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                            loader=loader, task=CLS, device=torch.device("cpu"),
                            privacy=privacy, ledger=ledger, dataset="d", run_id="r",
                            planned_epochs=2, round_epochs=2)
    logical = 2 * (n // batch)
    assert report.steps == logical
    assert ledger.run_history("d", "r") == [(1.0, 1 / (n // batch), logical)]
    assert max(sizes) <= chunk
    assert sum(sizes) > 0 and len(sizes) > logical  # batches were split
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None
               for p in net.parameters())


@pytest.mark.parametrize(("key", "value"), [("grad_sample_mode", "fast"),
                                            ("max_physical_batch", -1)])
def test_bad_privacy_values_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"privacy.{key}"):
        PrivacyConfig(mode="dp_sgd", **{key: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "value"), [("act", "gelu"), ("upsample", "bilinear")])
def test_bad_model_values_name_the_key_and_allowed(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"model.{key}=.*allowed values"):
        ModelConfig(name="unet", **{key: value})  # type: ignore[arg-type]


def test_resize_unet_keeps_shapes_and_parameter_count() -> None:
    deconv = build_model(SEG, ModelConfig(name="unet", channels=[4, 8, 16]), seed=0)
    resize = build_model(SEG, ModelConfig(name="unet", channels=[4, 8, 16], upsample="resize"),
                         seed=0)
    x = torch.randn(2, 1, 16, 16)
    assert resize(x).shape == deconv(x).shape == (2, 2, 16, 16)
    assert (sum(p.numel() for p in resize.parameters())
            == sum(p.numel() for p in deconv.parameters()))
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in resize.modules())


@pytest.mark.parametrize("slopes", [1, 3], ids=["shared-slope", "slope-per-channel"])
def test_prelu_rule_is_autograds_per_sample_gradient(slopes: int) -> None:
    layer = nn.PReLU(num_parameters=slopes, init=0.2)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 4, generator=gen)
    upstream = torch.randn(5, 3, 4, 4, generator=gen)  # dL/dy of L = sum(upstream * y)
    got = prelu_grad_sample(layer, [x], upstream)[layer.weight]
    want = []
    for i in range(len(x)):
        layer.zero_grad()
        (upstream[i:i + 1] * layer(x[i:i + 1])).sum().backward()
        want.append(layer.weight.grad.detach().clone())  # type: ignore[union-attr]
    assert got.shape == (5, slopes)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)
    layer.weight.requires_grad_(False)
    assert prelu_grad_sample(layer, [x], upstream) == {}


def test_hooks_mode_uses_the_prelu_rule_not_functorch() -> None:
    net = build_model(CLS, ModelConfig(name="cnn", channels=[4, 8]), seed=0)
    prelus = [m for m in net.modules() if isinstance(m, nn.PReLU)]
    assert prelus, "the default cnn has PReLU activations"
    x, y = _batch(CLS)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    dp = make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                      loader=poisson_loader(loader), noise_multiplier=1.0, max_grad_norm=1.0,
                      accountant="rdp", grad_sample_mode="hooks")
    make_loss(CLS)(dp.model(x), y).backward()
    for prelu in prelus:  # Opacus' functorch fallback prepares the layer with this attribute
        assert not hasattr(prelu, "ft_compute_sample_grad")
        assert prelu.weight.grad_sample.shape == (len(x), 1)  # type: ignore[attr-defined]
    dp.finish()


def _hooked_step(net: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor,
                 seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sample gradients and the noised, scaled ``.grad`` of one DP step in ``mode``."""
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x) // 2)
    dp = make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                      loader=poisson_loader(loader), noise_multiplier=1.0, max_grad_norm=CLIP,
                      accountant="rdp", grad_sample_mode=mode)
    dp.optimizer.generator = torch.Generator().manual_seed(seed)  # type: ignore[attr-defined]
    dp.optimizer.zero_grad(set_to_none=True)
    make_loss(CLS)(dp.model(x), y).backward()
    samples = {n: p.grad_sample.clone() for n, p in net.named_parameters()}  # type: ignore
    dp.optimizer.step()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}  # type: ignore[union-attr]
    dp.finish()
    return samples, grads


def test_output_hooks_equal_opacus_hooks_sample_by_sample_and_noise_draw_by_draw() -> None:
    """Same per-sample gradients as Opacus' hooks; same noised gradient from the same coins."""
    net = build_model(CLS, ModelConfig(name="cnn", channels=[4, 8]), seed=0)
    x, y = _batch(CLS)
    lean_samples, lean_grads = _hooked_step(net, "output_hooks", x, y, seed=7)
    opacus_samples, opacus_grads = _hooked_step(net, "hooks", x, y, seed=7)
    for name, sample in opacus_samples.items():
        assert lean_samples[name].shape == (len(x), *sample.shape[1:])
        torch.testing.assert_close(lean_samples[name], sample, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(lean_grads[name], opacus_grads[name], rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_output_hooks_sum_a_layer_used_twice_and_free_what_they_hold() -> None:
    """A layer called twice in one forward pass gets the sum; nothing is left on the layers."""
    layer = nn.Linear(3, 3)
    net = nn.Sequential(layer, nn.Tanh(), layer)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    from client.output_hooks import OutputGradSampleHooks

    hooks = OutputGradSampleHooks(net, batch_first=True, loss_reduction="sum")
    outputs: list[weakref.ref[torch.Tensor]] = []
    watch = layer.register_forward_hook(lambda _m, _i, out: outputs.append(weakref.ref(out)))
    loss = net(x).sum()
    loss.backward()
    del loss
    watch.remove()
    # no reference cycle through a hook keeps a layer's output alive past its graph
    assert len(outputs) == 2 and all(ref() is None for ref in outputs)
    got = layer.weight.grad_sample  # type: ignore[attr-defined]
    hooks.disable_hooks()
    want = []
    for i in range(len(x)):
        net.zero_grad()
        net(x[i:i + 1]).sum().backward()
        want.append(layer.weight.grad.detach().clone())  # type: ignore[union-attr]
    torch.testing.assert_close(got, torch.stack(want))
    assert not hasattr(layer, "activations")
    hooks.cleanup()


def test_output_hooks_are_exact_when_a_layer_output_is_changed_in_place() -> None:
    """A hook on the output sees dL/d(output as the layer returned it), in-place ops or not."""

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.conv(x).mul_(2.0)).mean(dim=(1, 2, 3))

    net = InPlace()
    x = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(4))
    from client.output_hooks import OutputGradSampleHooks

    hooks = OutputGradSampleHooks(net, batch_first=True, loss_reduction="sum")
    net(x).sum().backward()
    got = net.conv.weight.grad_sample  # type: ignore[attr-defined]
    hooks.disable_hooks()
    want = []
    for i in range(len(x)):
        net.zero_grad()
        net(x[i:i + 1]).sum().backward()
        want.append(net.conv.weight.grad.detach().clone())  # type: ignore[union-attr]
    torch.testing.assert_close(got, torch.stack(want))
    hooks.cleanup()
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    opacus = GradSampleHooks(net, batch_first=True, loss_reduction="sum")
    with pytest.raises(RuntimeError, match="modified inplace"):  # Opacus' own hooks refuse it
        net(x).sum().backward()
    opacus.cleanup()


@pytest.mark.parametrize("mode", ["output_hooks", "hooks"])
def test_an_empty_poisson_batch_takes_a_noise_only_accounted_step(mode: str) -> None:
    net = build_model(CLS, ModelConfig(name="cnn", channels=[4, 8]), seed=0)
    x, y = _batch(CLS)
    dp = make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                      loader=poisson_loader(DataLoader(TensorDataset(x, y), batch_size=3)),
                      noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp",
                      grad_sample_mode=mode)
    before = [p.detach().clone() for p in net.parameters()]
    dp.optimizer.zero_grad(set_to_none=True)
    dp.empty_batch()
    dp.optimizer.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(net.parameters(), before,
                                                               strict=True))
    assert dp.finish() == [(1.0, 0.5, 1)]


@pytest.mark.parametrize(("name", "kind", "channels"), [
    ("densenet121", "classification", [8]), ("resnet18", "classification", [8]),
    ("basicunet", "segmentation", [4, 4, 8, 8, 16, 4]), ("segresnet", "segmentation", [8]),
    ("attentionunet", "segmentation", [4, 8])])
def test_output_hooks_match_opacus_hooks_on_every_other_configured_network(
        name: str, kind: str, channels: list[int]) -> None:
    """The clipped (noise-free) update of output_hooks is Opacus' hooks' on each network."""
    task = TaskConfig(kind=kind, image_size=[32, 32])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 32, 32, generator=gen)
    y = torch.randint(0, 2, (4,), generator=gen) if kind == "classification" else (x > 0.3).long()
    updates = []
    for mode in ("hooks", "output_hooks"):
        net = build_model(task, ModelConfig(name=name, channels=channels), seed=0)
        dp = make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                          loader=poisson_loader(DataLoader(TensorDataset(x, y), batch_size=2)),
                          noise_multiplier=0.0, max_grad_norm=CLIP, accountant="rdp",
                          grad_sample_mode=mode, criterion=PerSampleLoss(task))
        dp.optimizer.zero_grad(set_to_none=True)
        make_loss(task)(dp.model(x), y).backward()
        dp.optimizer.step()
        updates.append([p.grad.clone() for p in net.parameters()])  # type: ignore[union-attr]
        dp.finish()
    for opacus, lean in zip(*updates, strict=True):
        torch.testing.assert_close(lean, opacus, rtol=1e-4, atol=1e-7)
