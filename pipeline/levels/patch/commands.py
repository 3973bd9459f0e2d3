"""The patch-model branches of ``cropmap train``, ``cropmap pretrain --method masked`` and ``cropmap evaluate``.

Kept out of :mod:`.cli` so that the command module only dispatches: a patch store
(``runs/SITE/YEAR/samples/patches``), a patch model (``--model stcln|utae``) or ``--method masked``
selects these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cropmap.models.patch.checkpoint import PATCH_MODELS
from cropmap.models.patch.training import PatchFitConfig
from cropmap.models.pretrain.masked import MaskedConfig
from cropmap.pipeline.errors import CropmapError, SamplesError
from cropmap.pipeline.levels.patch.patches import budget_patches, is_patch_store, load_patch_store, load_unlabelled, patch_split
from cropmap.pipeline.levels.patch.train import check_background, check_patch_model, evaluate_patch_model, pretrain_patch_encoder, train_patch_model

PATCH_MODEL_NAMES = tuple(sorted(PATCH_MODELS))


def wants_patches(model: str | None, samples: Path) -> bool:
    return model in PATCH_MODELS or is_patch_store(samples)


def train_patches(samples: Path, out: Path, *, model: str | None, pretrained: Path | None, label_fraction: float | None,
                  epochs: int, lr: float, batch_size: int, seed: int, device: str, background: str, augment: bool,
                  class_weighting: str, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """`cropmap train` on a patch store: validation = a seeded 15 % of the spatial blocks; ``label_fraction`` of the training patches."""
    if not is_patch_store(samples):
        raise CropmapError(f"model {model!r} trains on patch stores; {str(samples)!r} is not one",
                           fix="pass runs/SITE/YEAR/samples/patches (made by `cropmap run --level patch`)")
    name = model or "stcln"
    check_patch_model(name)
    check_background(background)
    ps = load_patch_store(samples)
    split = patch_split(ps.table, seed, test_fraction=0.15)
    train = split.train
    if label_fraction is not None:
        n = max(1, int(round(label_fraction * len([i for i in train if (ps.labels[i] > 0).any()]))))
        train = budget_patches(ps.labels, train, n, seed)
    cfg = PatchFitConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                         augment=augment, class_weighting=class_weighting)
    return train_patch_model(ps, train, split.test, out, model_name=name, fit_config=cfg, background=background, pretrained=pretrained,
                             extra_meta={"samples": str(samples)}, extra_files={"split.json": {**split.to_dict(), "budget": train}},
                             on_epoch=on_epoch)


def pretrain_patches(samples: list[Path], out: Path, *, model: str, epochs: int, lr: float, batch_size: int, mask_ratio: float,
                     gate: float | None, patch_size: int, seed: int, device: str, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """`cropmap pretrain --method masked`: patch stores and/or openEO ``.nc`` input cubes (labels ignored)."""
    if model != "stcln":
        raise CropmapError(f"--method masked pre-trains the STCLN reconstruction head, not --model {model!r}", fix="use --model stcln")
    stores = [p for p in samples if is_patch_store(p)]
    for p in samples:
        if not is_patch_store(p) and Path(p).suffix != ".nc":
            raise SamplesError(f"{str(p)!r} is neither a patch store nor an openEO .nc inputs cube",
                               fix="pass runs/SITE/YEAR/samples/patches or a *_preprocessed_inputs.nc file")
    if stores:
        first = load_patch_store(stores[0], labelled=False)
        bands, size = first.bands, int(first.x.shape[-1])
    else:
        from cropmap.pipeline.sites import S1_BANDS, S2_BANDS

        bands, size = [*S2_BANDS, *S1_BANDS], patch_size
    ps = load_unlabelled(samples, bands, size)
    if not np.isfinite(ps.x).any():
        raise SamplesError("the pre-training patches hold no observation", fix="check the input cubes")
    cfg = MaskedConfig(epochs=epochs, batch_size=batch_size, lr=lr, mask_ratio=mask_ratio, gate=gate, seed=seed,
                       device=device)
    return pretrain_patch_encoder(ps, out, model_name=model, config=cfg, extra_meta={"samples": [str(s) for s in samples]}, on_epoch=on_epoch)


def evaluate_patches(model: Path, samples: Path, device: str) -> dict:
    if not is_patch_store(samples):
        raise CropmapError(f"{str(model)!r} is a patch model but {str(samples)!r} is not a patch store",
                           fix="pass runs/SITE/YEAR/samples/patches (made by `cropmap run --level patch`)")
    return evaluate_patch_model(model, load_patch_store(samples), None, device)
