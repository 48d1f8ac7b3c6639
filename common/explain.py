"""Grad-CAM / Grad-CAM++ heatmaps of a classifier, with MONAI's ``monai.visualize``.

The target layer is the last convolutional feature layer, chosen by network
(:func:`target_layer`). Heatmaps are upsampled to the input (MONAI's linear
upsampler), set to zero outside the real image (:func:`content_box`: padding
the readers added is constant at the borders) and scaled to [0, 1] inside
it. The peak is searched only where it is meaningful: inside the real image,
at least half a feature cell away from its edges, because linear upsampling
with ``align_corners=False`` copies an edge cell's value out to the border,
and a plain argmax would then land on the border pixel instead of the cell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from monai.visualize import GradCAM, GradCAMpp
from monai.visualize.class_activation_maps import default_upsampler
from torch import nn

METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMpp}
"""Explanation methods by name."""

NAMED_LAYERS = {"densenet121": "class_layers.relu", "resnet18": "layer4", "resnet34": "layer4"}
"""The last feature layer of each named network (before global pooling)."""

CONTENT_TOLERANCE = 0.01
"""Share of an image's intensity range above its minimum that counts as image, not padding."""

Box = tuple[tuple[int, int], ...]


class ExplainError(ValueError):
    """A model or input that cannot be explained; the message says why."""


def target_layer(model: nn.Module, name: str | None = None) -> str:
    """The name of ``model``'s last convolutional feature layer.

    Args:
        model: a classifier from :func:`common.models.build_model` (DP
            variants too: their layer names are unchanged) or any CNN.
        name: ``model.name`` of the settings (``cnn``, ``densenet121``,
            ``resnet18``, ``resnet34``); None = decide from the structure.

    Raises:
        ExplainError: the network has no convolutional layer.
    """
    names = [n for n, _ in model.named_modules()]
    for known in (NAMED_LAYERS.get(name or ""), *NAMED_LAYERS.values()):
        if known in names:  # by name, else the layer names MONAI's DenseNet / ResNet use
            return str(known)
    layers = [n for n in names if re.fullmatch(r"net\.layer_\d+", n)]  # MONAI Classifier (cnn)
    if layers:
        return max(layers, key=lambda n: int(n.rsplit("_", 1)[1]))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Conv3d)]
    if not convs:
        raise ExplainError(f"{type(model).__name__} (model.name={name}) has no convolutional "
                           "layer to compute Grad-CAM on")
    return convs[-1]


def content_box(image: torch.Tensor) -> Box:
    """Where the real image is in ``image`` ``[C, *spatial]``: ``(start, stop)`` per axis.

    Readers zero-pad volumes to an aspect ratio after scaling intensities to
    [0, 1], so padding is the image's minimum: the box bounds every voxel
    above ``min + CONTENT_TOLERANCE * range`` (a constant image: all of it).
    """
    flat = image.detach().float().amax(0)
    low, high = float(flat.min()), float(flat.max())
    inside = flat > low + CONTENT_TOLERANCE * (high - low)
    if high <= low or not bool(inside.any()):
        return tuple((0, n) for n in flat.shape)
    box = []
    for axis in range(flat.ndim):
        other = tuple(a for a in range(flat.ndim) if a != axis)
        hits = torch.nonzero(inside.any(dim=other) if other else inside).flatten()
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def peak_of(heat: np.ndarray, box: Box, cell: tuple[float, ...]) -> tuple[int, ...]:
    """The heatmap's maximum inside ``box``, at least half a feature ``cell`` from its edges.

    Args:
        heat: ``[*spatial]`` heatmap.
        box: the real image, ``(start, stop)`` per axis.
        cell: input voxels per feature-map voxel, per axis.

    Returns:
        Voxel indices of the peak (the box's centre for an all-zero map).
    """
    inner = []
    for (start, stop), size in zip(box, cell, strict=True):
        margin = min(int(size // 2), (stop - start - 1) // 2)
        inner.append((start + margin, stop - margin))
    region = heat[tuple(slice(a, b) for a, b in inner)]
    if float(region.max()) <= 0:
        return tuple((a + b - 1) // 2 for a, b in box)
    local = np.unravel_index(int(np.argmax(region)), region.shape)
    return tuple(int(i) + a for i, (a, _) in zip(local, inner, strict=True))


@dataclass(frozen=True)
class Explanation:
    """One image's prediction and heatmap.

    Attributes:
        heatmap: float32 ``[*spatial]`` (the input's grid) in [0, 1], 0 outside the image.
        peak: voxel indices of the heatmap's maximum inside the image.
        probs: float32 ``[K]`` class probabilities (softmax).
        predicted: the most probable class.
        explained: the class the heatmap explains.
        box: the real image, ``(start, stop)`` per axis.
    """

    heatmap: np.ndarray
    peak: tuple[int, ...]
    probs: np.ndarray
    predicted: int
    explained: int
    box: Box


class Explainer:
    """Grad-CAM (or Grad-CAM++) of one classifier on its last feature layer.

    Args:
        model: a classifier mapping ``[B, C, *spatial]`` to logits ``[B, K]``.
        method: ``gradcam`` or ``gradcampp``.
        model_name: ``model.name`` of the settings, to pick the layer.
        layer: a layer name overriding the choice.
        device: where to compute.

    Raises:
        ExplainError: unknown method or layer, or no convolutional layer.
    """

    def __init__(self, model: nn.Module, *, method: str = "gradcam",
                 model_name: str | None = None, layer: str | None = None,
                 device: torch.device | None = None) -> None:
        if method not in METHODS:
            raise ExplainError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
        self.layer = layer or target_layer(model, model_name)
        if self.layer not in dict(model.named_modules()):
            raise ExplainError(f"{type(model).__name__} has no layer {self.layer!r}")
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.cam = METHODS[method](nn_module=self.model, target_layers=self.layer)

    def explain(self, images: torch.Tensor, class_idx: int | None = None) -> list[Explanation]:
        """Heatmaps of ``images`` ``[B, C, *spatial]`` for ``class_idx`` (None: the predicted).

        Raises:
            ExplainError: ``class_idx`` outside the model's classes.
        """
        x = images.float().to(self.device)
        with torch.no_grad():
            probs = torch.softmax(self.model(x), dim=1).cpu()
        if class_idx is not None and not 0 <= class_idx < probs.shape[1]:
            raise ExplainError(f"--class {class_idx} outside the model's {probs.shape[1]} classes")
        return [self._one(x[i:i + 1], probs[i], class_idx) for i in range(len(x))]

    def _one(self, x: torch.Tensor, probs: torch.Tensor, class_idx: int | None) -> Explanation:
        predicted = int(probs.argmax())
        explained = predicted if class_idx is None else class_idx
        raw = self.cam.compute_map(x, class_idx=explained).detach()  # [1, 1, *feature]
        spatial = tuple(x.shape[2:])
        heat = default_upsampler(spatial)(raw.float())[0, 0].cpu().numpy()
        box = content_box(x[0].cpu())
        outside = np.ones(spatial, dtype=bool)
        outside[tuple(slice(a, b) for a, b in box)] = False
        heat[outside] = 0.0
        heat = np.clip(heat, 0.0, None)
        top = float(heat.max())
        heat = (heat / top if top > 0 else heat).astype(np.float32)
        cell = tuple(s / f for s, f in zip(spatial, raw.shape[2:], strict=True))
        return Explanation(heat, peak_of(heat, box, cell), probs.numpy().astype(np.float32),
                           predicted, explained, box)
