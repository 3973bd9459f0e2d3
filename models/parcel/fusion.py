"""Optical + radar fusion variants of PSE-TSA (Ofori-Ampofo et al. 2021) and the parcel model registry.

Every variant takes a parcel batch (:func:`cropmap.models.parcel.batch.make_batch`: input name ->
:class:`~cropmap.models.parcel.psetae.SensorInput`) and returns (B, K) class scores usable as logits:

* ``none`` - one sensor (``s2`` or ``s1``) through one PSE + TAE + decoder;
* ``early`` - radar aligned on the optical dates, channels concatenated per date (12), one PSE + TAE;
* ``pse`` - one PSE per sensor (radar aligned on the optical dates), embeddings concatenated per
  date (256), one TAE (MLP [1024, 512, 256]);
* ``tsa`` - one PSE + TAE per sensor, each on its own dates, embeddings concatenated (128 || 128)
  into one decoder;
* ``decision`` - two complete streams with their own decoders; the class probabilities are averaged
  and their log returned (softmax of it gives back the average, so any softmax loss applies).
  The original averaged logits through a shared decoder and crashed at start; not reproduced.

:func:`build_parcel_model` builds a model from a config of plain types (kept in the model
directory); :func:`model_inputs` names the batch inputs a config needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cropmap.models.parcel.psetae import PSETAE, Decoder, PixelSetEncoder, SensorInput, TemporalAttentionEncoder

FUSIONS = ("none", "early", "pse", "tsa", "decision")
SENSOR_SETS = ("s2", "s1", "s1+s2")
PARCEL_MODELS = ("psetae",)


def _psetae_kw(cfg: dict) -> dict:
    return {"n_geom": cfg.get("n_geom", 4), "n_head": cfg.get("n_head", 4), "d_k": cfg.get("d_k", 32),
            "dropout": cfg.get("dropout", 0.2)}


class SingleSensor(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.input = cfg["sensors"][0]
        self.net = PSETAE(cfg["channels"][self.input], cfg["n_classes"], **_psetae_kw(cfg))

    def forward(self, batch: dict[str, SensorInput]) -> Tensor:
        return self.net(batch[self.input])


class EarlyFusion(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.net = PSETAE(cfg["channels"]["s2"] + cfg["channels"]["s1"], cfg["n_classes"], **_psetae_kw(cfg))

    def forward(self, batch: dict[str, SensorInput]) -> Tensor:
        return self.net(batch["early"])


class PSEFusion(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        kw = _psetae_kw(cfg)
        self.pse_s2 = PixelSetEncoder(cfg["channels"]["s2"], n_geom=kw["n_geom"])
        self.pse_s1 = PixelSetEncoder(cfg["channels"]["s1"], n_geom=kw["n_geom"])
        d = self.pse_s2.out_dim + self.pse_s1.out_dim
        self.tae = TemporalAttentionEncoder(d, kw["n_head"], kw["d_k"], [kw["n_head"] * d, 512, 256], kw["dropout"])
        self.decoder = Decoder([self.tae.out_dim, 64, 32, cfg["n_classes"]])

    def forward(self, batch: dict[str, SensorInput]) -> Tensor:
        s2, s1 = batch["s2"], batch["s1_on_s2"]
        e = torch.cat([self.pse_s2(s2), self.pse_s1(s1)], dim=-1)
        return self.decoder(self.tae(e, s2.days, s2.date_mask)[0])


class TSAFusion(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        kw = _psetae_kw(cfg)
        # the streams' own decoders are unused: only their encoders feed the shared decoder
        self.s2 = PSETAE(cfg["channels"]["s2"], 1, **kw)
        self.s1 = PSETAE(cfg["channels"]["s1"], 1, **kw)
        del self.s2.decoder, self.s1.decoder
        self.decoder = Decoder([self.s2.tae.out_dim + self.s1.tae.out_dim, 64, 32, cfg["n_classes"]])

    def forward(self, batch: dict[str, SensorInput]) -> Tensor:
        return self.decoder(torch.cat([self.s2.encode(batch["s2"]), self.s1.encode(batch["s1"])], dim=-1))


class DecisionFusion(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        kw = _psetae_kw(cfg)
        self.s2 = PSETAE(cfg["channels"]["s2"], cfg["n_classes"], **kw)
        self.s1 = PSETAE(cfg["channels"]["s1"], cfg["n_classes"], **kw)

    def forward(self, batch: dict[str, SensorInput]) -> Tensor:
        p = 0.5 * (torch.softmax(self.s2(batch["s2"]).float(), -1) + torch.softmax(self.s1(batch["s1"]).float(), -1))
        return torch.log(p.clamp_min(1e-12))


_VARIANTS = {"early": EarlyFusion, "pse": PSEFusion, "tsa": TSAFusion, "decision": DecisionFusion}


def check_config(model: str, fusion: str, sensors: str) -> None:
    """Raise ValueError for an unknown or inconsistent model / fusion / sensor choice."""
    if model not in PARCEL_MODELS:
        raise ValueError(f"unknown parcel model {model!r} (choose {', '.join(PARCEL_MODELS)})")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r} (choose {', '.join(FUSIONS)})")
    if sensors not in SENSOR_SETS:
        raise ValueError(f"unknown sensors {sensors!r} (choose {', '.join(SENSOR_SETS)})")
    if fusion == "none" and sensors == "s1+s2":
        raise ValueError("fusion 'none' takes one sensor (s2 or s1); with s1+s2 pick early, pse, tsa or decision")
    if fusion != "none" and sensors != "s1+s2":
        raise ValueError(f"fusion {fusion!r} needs sensors s1+s2, got {sensors!r}")


def model_inputs(cfg: dict) -> list[str]:
    """Batch input names of a model config."""
    return {"none": list(cfg["sensors"][:1]), "early": ["early"], "pse": ["s2", "s1_on_s2"],
            "tsa": ["s2", "s1"], "decision": ["s2", "s1"]}[cfg["fusion"]]


def build_parcel_model(cfg: dict[str, Any]) -> nn.Module:
    """The network of a parcel model config (``fusion``, ``sensors``, ``channels``, ``n_classes``, ...)."""
    if cfg["fusion"] == "none":
        return SingleSensor(cfg)
    return _VARIANTS[cfg["fusion"]](cfg)
