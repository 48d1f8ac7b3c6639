"""``python -m client explain``: Grad-CAM heatmaps of a run's model over this hospital's images.

    python -m client explain --model RUN_DIR/model --data-path /data/site-a --out ./explain \\
        [--split test|val|train|all] [--method gradcam|gradcampp] [--limit N] [--class K]

The images are read with the loaders and preprocessing training uses (the
exported model's settings, ``data.path`` = this hospital's folder, divided by
the same split policy as the node's). ``--data-path`` may also be one image
file (PNG/JPEG, DICOM, NIfTI) or a MedMNIST ``.npz`` (its own splits). PNG
overlays and ``predictions.csv`` go into ``--out`` on this machine; nothing
is sent anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

import torch

from client.hospital import SplitPolicy
from common.config import Settings
from common.data import DataError, load_site
from common.data.labelled_folder import load_labelled, read_labels, to_task
from common.data.medmnist import SPLITS, load_split
from common.data.readers import is_image, read_image
from common.explain import METHODS, Explainer, ExplainError
from common.explain_output import write_explanations

Samples = tuple[torch.Tensor, list[int | None], list[str]]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="exported model/ or its run folder")
    p.add_argument("--data-path", type=Path, required=True,
                   help="this hospital's folder (labels.csv), one image file, or a .npz")
    p.add_argument("--out", type=Path, required=True, help="local folder for PNGs and the CSV")
    p.add_argument("--split", choices=("test", "val", "train", "all"), default="test")
    p.add_argument("--method", choices=tuple(METHODS), default="gradcam")
    p.add_argument("--limit", type=int, help="explain at most N images")
    p.add_argument("--class", dest="class_idx", type=int,
                   help="explain class K (default: each image's predicted class)")
    policy = SplitPolicy()
    p.add_argument("--split-seed", type=int, default=policy.seed)
    p.add_argument("--val-fraction", type=float, default=policy.val_fraction)
    p.add_argument("--test-fraction", type=float, default=policy.test_fraction)
    return p.parse_args(argv)


def _key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def folder_samples(settings: Settings, folder: Path, split: str) -> Samples:
    """A labelled folder's images of ``split``, each named by its file (as the node splits it)."""
    rows = read_labels(folder, settings.data.labels_csv)
    x, y = load_labelled(rows, settings.task)
    if split == "all":
        return x, [int(v) for v in y], [str(path.relative_to(folder)) for path, _ in rows]
    site = load_site(settings, 0, data_path=str(folder))
    part = getattr(site, split)
    names: dict[str, list[str]] = {}
    for image, (path, _) in zip(x, rows, strict=True):
        names.setdefault(_key(image), []).append(str(path.relative_to(folder)))
    images = torch.stack([part[i][0] for i in range(len(part))]) if len(part) else x[:0]
    return (images, [int(part[i][1]) for i in range(len(part))],
            [names[_key(img)].pop(0) for img in images])


def npz_samples(settings: Settings, path: Path, split: str) -> Samples:
    """A MedMNIST file's ``split`` (``all``: every split), named ``split:index``."""
    xs: list[torch.Tensor] = []
    labels: list[int | None] = []
    names: list[str] = []
    for name in SPLITS if split == "all" else (split,):
        x, y = load_split(path, name, settings.task)
        xs.append(x)
        labels += [int(v) for v in y]
        names += [f"{name}:{i}" for i in range(len(x))]
    return torch.cat(xs), labels, names


def load_samples(settings: Settings, data_path: Path, split: str,
                 policy: SplitPolicy) -> Samples:
    """This hospital's images as training preprocesses them, their labels (if known), names.

    Raises:
        DataError: missing or unreadable data, a segmentation model.
    """
    if settings.task.kind != "classification":
        raise DataError("explain needs a classification model; this one is "
                        f"task.kind={settings.task.kind}")
    data = dataclasses.replace(settings.data, path=str(data_path), source="folder",
                               val_fraction=policy.val_fraction,
                               test_fraction=policy.test_fraction)
    own = dataclasses.replace(settings, seed=policy.seed, data=data)
    if data_path.is_dir():
        return folder_samples(own, data_path, split)
    if data_path.suffix.lower() == ".npz":
        return npz_samples(own, data_path, split)
    if data_path.is_file() and is_image(data_path):
        image = to_task(read_image(data_path), settings.task, data_path)
        return image[None], [None], [data_path.name]
    raise DataError(f"--data-path {data_path}: not a folder, an image file or a .npz")


def main(argv: list[str]) -> int:
    """Explain this hospital's images; the exit code (2: bad input)."""
    args = parse(argv)
    from common.export import ExportError, load_export

    try:
        policy = SplitPolicy(seed=args.split_seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction)
        exported = load_export(args.model)
        images, labels, names = load_samples(exported.settings, args.data_path, args.split,
                                             policy)
        if args.limit is not None:
            images, labels, names = images[:args.limit], labels[:args.limit], names[:args.limit]
        explainer = Explainer(exported.model, method=args.method,
                              model_name=exported.settings.model.name)
        csv_path = write_explanations(explainer, images, labels, names, args.out,
                                      class_idx=args.class_idx)
    except (ExportError, DataError, ExplainError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"explained {len(names)} image(s) with {args.method}: {csv_path} and "
          f"{len(names)} PNG(s) in {args.out} (kept on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
