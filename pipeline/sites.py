"""Sites and class legends: the YAML files of ``regions/`` loaded into typed, validated configs.

A *site* is a mapped area on one UTM grid (name, extent, CRS, data source, label source,
legend, years, and the stage settings it needs). A *legend* maps label-source codes onto the
crop map's raster codes 1..K with names and colours. Both are validated once, here, and every
problem is reported as one line naming the file, the field and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cropmap.pipeline.errors import SiteError
from cropmap.regions import LEGENDS_DIR, REGIONS_DIR, SITES_DIR

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
S2_BANDS = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S1_BANDS = ("VV", "VH")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LegendClass(_Strict):
    code: int = Field(ge=1, le=255)
    """Raster value in the crop map (0 is nodata)."""
    name: str = Field(min_length=1)
    color: str = Field(pattern=r"^#[0-9a-fA-F]{6}$")
    source_codes: list[int] = Field(default_factory=list)
    """Codes of the label source (e.g. CDL, RPG CODE_GROUP, WorldCereal CT) mapped to this class."""


class Legend(_Strict):
    name: str
    title: str = ""
    source_codes: str = ""
    """What the ``source_codes`` of the classes are."""
    classes: list[LegendClass] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Legend:
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise ValueError(f"class codes must be unique, got {codes}")
        if codes != list(range(1, len(codes) + 1)):
            raise ValueError(f"class codes must be 1..{len(codes)} in order, got {codes}")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError("class names must be unique")
        seen: dict[int, str] = {}
        for c in self.classes:
            for s in c.source_codes:
                if s in seen:
                    raise ValueError(f"source code {s} is mapped to both {seen[s]!r} and {c.name!r}")
                seen[s] = c.name
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def source_lookup(self) -> dict[int, int]:
        """Label-source code -> raster class code."""
        return {s: c.code for c in self.classes for s in c.source_codes}


class LocalTile(_Strict):
    id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Tile folder name in the archive; also names run files (``cube/<id>.zarr``), so no path separators."""
    year: int


class LocalSource(_Strict):
    root: str
    """Archive folder, relative to ``regions/`` or absolute."""
    label_variable: str = "CT"
    tiles: list[LocalTile] = Field(min_length=1)


class Bands(_Strict):
    s2: list[str] = Field(default_factory=lambda: list(S2_BANDS))
    s1: list[str] = Field(default_factory=lambda: list(S1_BANDS))

    @field_validator("s2", "s1")
    @classmethod
    def _known(cls, v: list[str], info) -> list[str]:
        sensor, valid = ("Sentinel-2", S2_BANDS) if info.field_name == "s2" else ("Sentinel-1", S1_BANDS)
        bad = [b for b in v if b not in valid]
        if bad:
            raise ValueError(f"unknown {sensor} band(s) {bad}; valid: {list(valid)}")
        return v

    @property
    def all(self) -> list[str]:
        return [*self.s2, *self.s1]


class CloudMask(_Strict):
    scl_invalid: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 7, 8, 9, 10, 11])
    """Sentinel-2 scene-classification classes treated as cloud, shadow, snow or no data."""


class Tensors(_Strict):
    s1_window_days: int = Field(default=0, ge=0, le=60)
    """Average Sentinel-1 acquisitions over windows of this many days, in linear power (0 = raw)."""


class Pretrain(_Strict):
    """Self-supervised pre-training of the model's encoder on the site's own (unlabelled) pixels."""

    method: Literal["none", "moco"] = "none"
    pixels: int = Field(default=20000, ge=16)
    """Pixels drawn at random (seeded) from every tile of the run, labelled or not; labels are never used."""
    epochs: int = Field(default=100, ge=1)
    patience: int = Field(default=10, ge=1)
    batch_size: int = Field(default=512, ge=4)
    lr: float = Field(default=1e-3, gt=0)
    queue_size: int = Field(default=65536, ge=1)
    momentum: float = Field(default=0.999, ge=0, lt=1)
    temperature: float = Field(default=0.07, gt=0)
    """0.07 as SITS-MoCo (MoCo v1); 0.2 is MoCo v2's."""
    view_length: int = Field(default=70, ge=4)
    freeze_encoder: bool = False
    """Fine-tune only the classifier head on the pre-trained encoder (else the whole model)."""

    def moco_config(self, device: str | None = None, seed: int = 0):
        from cropmap.models.pretrain.moco import MoCoConfig

        return MoCoConfig(epochs=self.epochs, patience=self.patience, batch_size=self.batch_size, lr=self.lr,
                          queue_size=self.queue_size, momentum=self.momentum, temperature=self.temperature,
                          view_length=self.view_length, seed=seed, device=device or "auto")


AUTO = "auto"
DEFAULT_CANDIDATES = ("ltae", "presto", "presto-embed", "forest", "boosting")
"""The candidates of ``training.model: auto``: the best from-scratch deep model of the benchmarks
(L-TAE, benchmarks/RESULTS.md "Candidates"), Presto fine-tuned, Presto embeddings + boosting, the
random forest and gradient boosting."""


class Candidate(_Strict):
    """One candidate of ``training.model: auto``: a pixel model and what it changes of the recipe."""

    model: str
    model_options: dict[str, Any] = Field(default_factory=dict)
    epochs: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, ge=1)
    max_len: int | None = Field(default=None, ge=4)
    max_pixels_per_parcel: int | None = Field(default=None, ge=1)
    """Fewer training pixels per parcel than the site's (pixels of one field are near copies; a slow model learns as much from fewer)."""

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, data: Any) -> Any:
        return {"model": data} if isinstance(data, str) else data

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        from cropmap.models.registry import model_names

        if v not in model_names("pixel"):
            raise ValueError(f"unknown pixel model {v!r}; choose from {', '.join(model_names('pixel'))}")
        return v


class Training(_Strict):
    model: str = AUTO
    """A pixel model by name, or ``auto``: train every one of ``candidates`` on the same split seeds, map
    with the one of the best validation macro F1 (ties by validation OA), its split-seed models averaged."""
    candidates: list[Candidate] = Field(default_factory=lambda: [Candidate(model=m) for m in DEFAULT_CANDIDATES], min_length=1)
    """The candidates of ``model: auto`` (names, or ``{model: NAME, epochs: ..., ...}`` to change their recipe)."""
    blend: bool = True
    """With ``auto``, one more candidate, ``blend``: the mean of every candidate's calibrated class probabilities
    (scored on validation like the others; if it wins, the map averages all candidates of all split seeds)."""
    model_options: dict[str, Any] = Field(default_factory=dict)
    """Constructor options of the model (e.g. ``pooling: mean`` for STNet); with ``auto``, set them per candidate."""
    pool_years: bool = False
    """Train on labelled tiles of every site year up to the run year (not only the run year)."""
    transfer: Literal["none", "previous-year"] = "none"
    """``previous-year``: initialise each model from last year's run of the same output root (when there is one)."""
    transfer_compare_scratch: bool = True
    """With ``transfer``, also train from scratch on the same splits and report the difference (the ``transfer`` stage)."""
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    class_weighting: Literal["sqrt", "balanced", "none"] = "sqrt"
    jitter_days: float = Field(default=15.0, ge=0)
    """Augmentation: shift each training series in time by up to this many days."""
    offset_std: float = Field(default=0.3, ge=0)
    """Augmentation: per-series, per-band offset ~ N(0, offset_std) in z-units."""
    date_noise_p: float = Field(default=0.15, ge=0, le=1)
    """Augmentation: probability that a date gets cloud/shadow-like noise (SITS-MoCo)."""
    band_drop_p: float = Field(default=0.3, ge=0, le=1)
    """Augmentation: probability that a series loses the bands some training tiles lack."""
    max_len: int = Field(default=48, ge=4)
    """Observations per series fed to the model (longer series are subsampled, deterministically at test time)."""
    max_pixels_per_parcel: int = Field(default=100, ge=1)
    split_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    """Parcel-disjoint splits repeated with these seeds; the map uses the first seed's model."""
    test_fraction: float = Field(default=0.3, gt=0, lt=1)
    val_fraction: float = Field(default=0.15, ge=0, lt=1)
    split: Literal["blocks", "parcels"] = "blocks"
    """``blocks``: spatial blocks of ``block_size_m`` where sample locations are known, parcel-disjoint
    inside (:mod:`cropmap.pipeline.splits`); ``parcels``: parcel-disjoint only (optimistic: neighbours share soil and farmer)."""
    block_size_m: float = Field(default=1000.0, gt=0, le=100_000)
    """Side of the square split blocks, metres (larger than typical fields; the demo's 640 m tiles use 320 m)."""
    min_parcel_pixels: int = Field(default=3, ge=1)
    """Parcels smaller than this (tile-edge slivers) are not sampled."""
    loss: Literal["ce", "focal"] = "ce"
    focal_gamma: float = Field(default=1.0, ge=0)
    patience: int = Field(default=10, ge=1)
    """Early stopping: epochs without validation improvement (needs val_fraction > 0)."""
    pretrain: Pretrain = Field(default_factory=Pretrain)

    @model_validator(mode="after")
    def _check_model(self) -> Training:
        from cropmap.models.registry import model_names

        if self.model != AUTO and self.model not in model_names("pixel"):
            raise ValueError(f"unknown pixel model {self.model!r}; choose auto or one of {', '.join(model_names('pixel'))}")
        names = [c.model for c in self.candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"training.candidates lists a model twice: {names}")
        if self.model == AUTO and self.pretrain.method != "none":
            raise ValueError("pre-training (training.pretrain) needs one model: set training.model (e.g. stnet) instead of auto")
        if self.model == AUTO and self.transfer != "none":
            raise ValueError("transfer from last year needs one model: set training.model (e.g. stnet) instead of auto")
        if self.model == AUTO and self.model_options:
            raise ValueError("training.model_options with model auto: give them per candidate ({model: NAME, model_options: {...}})")
        return self

    @property
    def auto(self) -> bool:
        return self.model == AUTO

    def candidate_list(self) -> list[Candidate]:
        """The models this site trains: the candidates with ``auto``, else the one model."""
        return list(self.candidates) if self.auto else [Candidate(model=self.model, model_options=self.model_options)]

    def augment(self):
        """The training augmentations as :class:`cropmap.models.series.Augment`."""
        from cropmap.models.series import Augment

        return Augment(self.jitter_days, self.offset_std, self.date_noise_p, self.band_drop_p)


class ParcelTraining(_Strict):
    """The parcel path (``level: parcel`` or ``cropmap run --level parcel``): PSE-TSA on parcel pixel sets."""

    model: Literal["psetae", "auto"] = "auto"
    """``psetae``; or ``auto``: PSE-TSA and the series ``candidates`` (pixel models fitted on each parcel's
    mean series: Presto embeddings + boosting, the forest, boosting, ...) on the same split seeds, mapped
    with the best on validation macro F1 (ties by OA), its split-seed models averaged."""
    candidates: list[str] = Field(default_factory=lambda: ["psetae", "presto-embed", "forest", "boosting"], min_length=1)
    """The candidates of ``model: auto``: ``psetae`` and pixel model names (trained on parcel-mean series)."""
    blend: bool = True
    """With ``auto``: one more candidate, the mean of every candidate's (calibrated) probabilities."""
    fusion: Literal["none", "early", "pse", "tsa", "decision"] = "tsa"
    sensors: Literal["s2", "s1", "s1+s2"] = "s1+s2"
    alignment: Literal["nn", "linear"] = "nn"
    """S1 -> S2 date alignment of early and PSE fusion: nearest unused date or linear interpolation."""
    s2_date_fraction: float | None = Field(default=None, gt=0, le=1)
    until: str | None = Field(default=None, pattern=r"^(\d{4}-)?\d\d-\d\d$")
    """Early-season experiment: series end at this MM-DD of the season year."""
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=16, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    loss: Literal["ce", "focal"] = "focal"
    focal_gamma: float = Field(default=1.0, ge=0)
    class_weighting: Literal["sqrt", "balanced", "none"] = "none"
    patience: int = Field(default=20, ge=1)
    sample_pixels: int = Field(default=32, ge=1)
    """Pixels drawn per parcel and training step (the study: 64)."""
    max_pixels: int = Field(default=64, ge=1)
    """Pixels stored per parcel (a seeded random draw); evaluation uses all of them."""
    min_clear_fraction: float = Field(default=0.5, gt=0, le=1)
    """An optical date is kept for a parcel when at least this fraction of its pixels is clear."""
    s1_window_days: int = Field(default=12, ge=0, le=60)
    """Radar acquisitions averaged (in linear power) over this many days (0: raw acquisitions)."""

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, v: list[str]) -> list[str]:
        from cropmap.models.registry import model_names

        bad = [c for c in v if c != "psetae" and c not in model_names("pixel")]
        if bad:
            raise ValueError(f"unknown parcel candidate(s) {bad}; choose psetae or pixel models ({', '.join(model_names('pixel'))})")
        if len(set(v)) != len(v):
            raise ValueError(f"parcel.candidates lists a model twice: {v}")
        return v

    def candidate_list(self) -> list[str]:
        return list(self.candidates) if self.model == "auto" else ["psetae"]


class PatchPretrain(_Strict):
    """Masked spatiotemporal pre-training of the patch model (STCLN) before fine-tuning (``patch.pretrain``)."""

    method: Literal["none", "masked"] = "none"
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    mask_ratio: float = Field(default=0.4, gt=0, lt=1)
    """Probability that a valid (date, pixel) cell is masked (STCLN: 0.15-0.4)."""
    gate: float | None = Field(default=None, ge=0, lt=1)
    """Only dates where more than this fraction of a patch's pixels has NDVI > 0.2 are maskable (STCLN: 0.9)."""
    extra_cubes: list[str] = Field(default_factory=list)
    """Unlabelled openEO inputs cubes (``*_preprocessed_inputs.nc``, relative to ``regions/`` or absolute) added to the site's patches."""

    def resolved_cubes(self) -> list[Path]:
        out = []
        for c in self.extra_cubes:
            p = Path(os.path.expandvars(c)).expanduser()
            out.append(p if p.is_absolute() else REGIONS_DIR / p)
        return out


class PatchTraining(_Strict):
    """The patch path (``level: patch`` or ``cropmap run --level patch``): segmentation of T x C x H x W patches."""

    model: Literal["stcln", "utae"] = "stcln"
    model_options: dict[str, Any] = Field(default_factory=dict)
    patch_size: int = Field(default=16, ge=4, le=512)
    block: int = Field(default=2, ge=1)
    """Splits assign whole blocks of block x block patches (spatial blocking)."""
    composite_days: int = Field(default=15, ge=1, le=92)
    """Patches are composited on bins of this many days from 1 January of the season year."""
    background: Literal["void", "class"] = "void"
    """``void``: label 0 is ignored in the loss and metrics; ``class``: it is a background class."""
    label_patches: int | None = Field(default=None, ge=1)
    """Label budget: train on this many labelled training patches (seeded draw); None: all."""
    val_fraction: float | None = Field(default=None, ge=0, lt=1)
    """Share of the non-test blocks held out as validation (best epoch by validation OA); None: ``training.val_fraction``.
    0: a fixed schedule on every non-test block (small sites, where a few validation blocks cost a large share of the
    training patches)."""
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    class_weighting: Literal["sqrt", "balanced", "none"] = "sqrt"
    window: int = Field(default=32, ge=4)
    """Prediction: side of the sliding windows."""
    overlap: int = Field(default=16, ge=0)
    """Prediction: overlap of neighbouring windows (each keeps its core, see pipeline/levels/patch/predict.py)."""
    pretrain: PatchPretrain = Field(default_factory=PatchPretrain)

    def split_val_fraction(self, training: Training) -> float:
        """The validation share the patch split uses: this section's, else the training section's."""
        return training.val_fraction if self.val_fraction is None else self.val_fraction

    @model_validator(mode="after")
    def _check(self) -> PatchTraining:
        if self.overlap >= self.window:
            raise ValueError(f"overlap {self.overlap} must be smaller than window {self.window}")
        if self.pretrain.method == "masked" and self.model != "stcln":
            raise ValueError(f"masked pre-training needs model stcln, not {self.model!r}")
        return self


class Parcels(_Strict):
    path: str
    """Parcel file (Shapefile, GeoPackage or GeoParquet), relative to ``regions/`` or absolute; kept local."""
    code_column: str = "CODE_GROUP"
    """Column of crop codes mapped by the legend's ``source_codes`` (RPG ``CODE_GROUP``, EuroCrops ``EC_hcat_c``)."""
    id_column: str | None = None
    """Column of parcel ids (RPG ``ID_PARCEL``); ``None``: parcels are recovered from the raster."""
    layer: str | None = None
    """Layer of a multi-layer GeoPackage."""

    def resolved(self) -> Path:
        p = Path(os.path.expandvars(self.path)).expanduser()
        return p if p.is_absolute() else REGIONS_DIR / p


class Gee(_Strict):
    """Earth Engine settings of a ``source: gee`` site (see ``pipeline/ingest/gee``)."""

    project: str | None = None
    """Cloud project registered for Earth Engine; ``$EE_PROJECT`` when unset."""
    bucket: str | None = None
    """Cloud Storage bucket the exports go to (``gs://`` prefix optional)."""
    export_folder: str | None = None
    """Local folder holding the exports (a synced copy of the bucket, or the fake client's output)."""
    prefix: str = "cropmap"
    """Object prefix inside the bucket: exports are named ``{prefix}/{site}/{year}/{kind}/{tile}``."""
    tile_size_m: float = Field(default=30_000, ge=640, le=100_000)
    """Side of the snapped UTM export tiles (20-50 km recommended)."""
    grid_origin: tuple[float, float] = (0.0, 0.0)
    """Tiles are snapped to multiples of ``tile_size_m`` from this point (site CRS)."""
    composite_days: int = Field(default=10, ge=1, le=92)
    season_start_month: int = Field(default=1, ge=1, le=12)
    """First month of the season; the season lasts ``season_months`` and ends in the run year."""
    season_months: int = Field(default=12, ge=1, le=24)
    cs_cdf_threshold: float = Field(default=0.6, ge=0.3, le=0.9)
    """Cloud Score+ ``cs_cdf`` at or above which a Sentinel-2 pixel is clear (0.5-0.65 works)."""
    exclude_scl: list[int] = Field(default_factory=lambda: [3, 8, 9, 10, 11])
    """Also drop these Sentinel-2 SCL classes (empty list: Cloud Score+ only)."""
    max_cloudy_percent: float = Field(default=80, gt=0, le=100)
    orbit_pass: Literal["ASCENDING", "DESCENDING"] = "ASCENDING"
    cdl_confidence: int = Field(default=95, ge=0, le=100)
    """CDL pixels are labels only where ``confidence`` exceeds this and their 3x3 window is uniform."""
    file_dimensions: int = Field(default=2560, ge=256, le=32768)
    """Pixels per side of one exported GeoTIFF shard (a multiple of the 256 shard size)."""
    max_pixels: float = Field(default=1e10, ge=1e6, le=1e13)
    max_pending: int = Field(default=20, ge=1, le=3000)
    """Tasks of this project queued or running at once (Earth Engine caps a project at 3000)."""
    max_attempts: int = Field(default=3, ge=1, le=10)
    max_split_depth: int = Field(default=2, ge=0, le=4)
    """A tile failing with a memory or timeout error is split into 4, at most this many times."""
    samples_per_class: int = Field(default=500, ge=1)
    """Most table-sample points per legend class and tile (``classPoints``); the row budget may lower it."""
    table_rows_per_tile: int = Field(default=100_000, ge=1_000)
    """Row budget of one tile's sample table: points per class are lowered so that points x (S2 days +
    S1 acquisitions) of the season stays within it (``pipeline.ingest.gee.sampling``)."""
    block_size_m: float = Field(default=10_000, gt=0)
    """Training samples are split train/val/test by spatial blocks of this side."""
    tile_scale: int = Field(default=4, ge=1, le=16)
    cubes: Literal["export", "pixels"] = "export"
    """How the composite cubes travel: ``export`` (batch GeoTIFF exports to the bucket, any size) or
    ``pixels`` (interactive computePixels requests, no bucket round trip: county-size sites)."""
    samples: Literal["cube", "table"] = "cube"
    """Training pixels of the tensors stage: ``cube`` (every labelled pixel of the composite cube,
    parcel-disjoint splits) or ``table`` (a stratified sample, ``samples_per_class`` per CDL class
    and tile, of raw clear acquisitions, exported as CSV tables; split by spatial blocks of
    ``block_size_m``). ``table`` suits state-wide CDL sites, where every labelled pixel is far too many."""
    max_concurrent_requests: int = Field(default=8, ge=1, le=32)
    """computePixels requests in flight at once (Earth Engine allows 40 per endpoint)."""
    aux: list[Literal["era5", "srtm"]] = Field(default_factory=list)
    """Auxiliary inputs exported on the cube's grid for the pre-trained encoder (Presto): ``era5``
    (monthly ERA5-Land 2 m temperature and total precipitation), ``srtm`` (elevation, slope). Off by
    default: their benefit is not benchmarked (see pipeline/ingest/gee/aux.py)."""

    @field_validator("aux")
    @classmethod
    def _aux(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists an input twice: {v}")
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.removeprefix("gs://").strip("/")
        if not re.match(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$", v):
            raise ValueError(f"{v!r} is not a Cloud Storage bucket name")
        return v

    @field_validator("file_dimensions")
    @classmethod
    def _shards(cls, v: int) -> int:
        if v % 256:
            raise ValueError(f"must be a multiple of the 256-pixel shard size, got {v}")
        return v

    @model_validator(mode="after")
    def _dest(self) -> Gee:
        if not self.bucket and not self.export_folder:
            raise ValueError("set `bucket` (Cloud Storage) or `export_folder` (local copy of the exports)")
        if self.aux and self.cubes == "pixels":
            raise ValueError("aux inputs are batch exports: use cubes: export with aux, or drop aux")
        return self

    def folder(self) -> Path | None:
        if self.export_folder is None:
            return None
        p = Path(os.path.expandvars(self.export_folder)).expanduser()
        return p if p.is_absolute() else REGIONS_DIR / p


class Zone(_Strict):
    """One UTM zone of a site that spans several: the part of the site exported on this zone's grid."""

    crs: str = Field(pattern=r"^EPSG:32[67]\d\d$")
    """A WGS 84 / UTM CRS (EPSG:326ZZ north, 327ZZ south)."""
    extent: tuple[float, float, float, float]
    """xmin ymin xmax ymax of this zone's part, in this zone's CRS."""

    @property
    def suffix(self) -> str:
        code = int(self.crs.split(":")[1])
        return f"utm{code % 100:02d}{'n' if code < 32700 else 's'}"


class Boundary(_Strict):
    """Where the site's geometry comes from (documentation, and the plan's share of each tile inside it)."""

    collection: str | None = None
    """Earth Engine FeatureCollection that defines the site (e.g. ``TIGER/2018/States``)."""
    filter: dict[str, str | int] = Field(default_factory=dict)
    """Property values selecting the site's feature(s) in ``collection`` (e.g. ``{NAME: Illinois}``)."""
    file: str | None = None
    """A polygon file (GeoJSON, GeoPackage, Shapefile; relative to ``regions/`` or absolute): used
    offline by ``cropmap ingest --plan`` for the share of each tile inside the site."""
    bounds_lonlat: tuple[float, float, float, float] | None = None
    """west south east north (degrees) the ``extent`` was derived from."""
    source: str = ""
    """Where these facts come from."""

    def resolved_file(self) -> Path | None:
        if self.file is None:
            return None
        p = Path(os.path.expandvars(self.file)).expanduser()
        return p if p.is_absolute() else REGIONS_DIR / p


class Site(_Strict):
    name: str
    title: str = ""
    crs: str = Field(pattern=r"^EPSG:\d{4,5}$")
    resolution: float = Field(gt=0)
    extent: tuple[float, float, float, float]
    source: Literal["local", "gee"]
    label_source: Literal["parcel-raster", "cdl", "parcels"]
    """``parcel-raster``: the local archive's label raster; ``cdl``: USDA CDL from Earth Engine;
    ``parcels``: a local parcel file (RPG, EuroCrops) rasterised on each tile."""
    legend: str
    years: list[int] = Field(min_length=1)
    default_year: int | None = None
    local: LocalSource | None = None
    gee: Gee | None = None
    parcels: Parcels | None = None
    bands: Bands = Field(default_factory=Bands)
    cloud_mask: CloudMask = Field(default_factory=CloudMask)
    tensors: Tensors = Field(default_factory=Tensors)
    training: Training = Field(default_factory=Training)
    level: Literal["pixel", "parcel", "patch"] = "pixel"
    """``parcel``: ``cropmap run`` maps parcels (PSE-TSA, ``parcel:``) instead of pixels; ``patch``: segments
    patches (STCLN or U-TAE, ``patch:``)."""
    parcel: ParcelTraining = Field(default_factory=ParcelTraining)
    patch: PatchTraining = Field(default_factory=PatchTraining)
    zones: list[Zone] = Field(default_factory=list)
    """A site spanning several UTM zones: its parts, one per zone, each exported and mapped on its
    own zone's grid as the site ``<name>-utmZZn`` (``cropmap run --site <name>-utm15n``), then joined
    with ``cropmap mosaic``. The top-level ``crs``/``extent`` cover the whole site in one zone."""
    boundary: Boundary | None = None
    provenance: str = ""
    """Where the site's facts (area, state, labels) come from, and what is not confirmed."""

    @model_validator(mode="before")
    @classmethod
    def _training_level(cls, data: Any) -> Any:
        """``training.level`` is accepted as another spelling of the top-level ``level``."""
        if isinstance(data, dict) and isinstance(data.get("training"), dict) and "level" in data["training"]:
            training = dict(data["training"])
            lvl = training.pop("level")
            if "level" in data and data["level"] != lvl:
                raise ValueError(f"level {data['level']!r} and training.level {lvl!r} disagree; set one of them")
            data = {**data, "training": training, "level": lvl}
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not SITE_NAME.match(v):
            raise ValueError("must be lower-case letters, digits, '-' or '_' (at most 64)")
        return v

    @model_validator(mode="after")
    def _check(self) -> Site:
        xmin, ymin, xmax, ymax = self.extent
        if not (xmin < xmax and ymin < ymax):
            raise ValueError(f"extent must be [xmin, ymin, xmax, ymax] with min < max, got {list(self.extent)}")
        if self.gee is not None and self.gee.samples == "table" and self.label_source != "cdl":
            raise ValueError("gee.samples: table samples CDL labels in Earth Engine; with label_source "
                             f"{self.label_source!r} (labels kept local) use gee.samples: cube")
        if self.default_year is not None and self.default_year not in self.years:
            raise ValueError(f"default_year {self.default_year} is not one of years {self.years}")
        if self.source == "local" and self.local is None:
            raise ValueError("source 'local' needs a 'local:' section (root, tiles)")
        if self.source == "gee" and self.gee is None:
            raise ValueError("source 'gee' needs a 'gee:' section (bucket or export_folder, tile_size_m, ...)")
        if self.label_source == "parcel-raster" and self.source != "local":
            raise ValueError("label_source 'parcel-raster' needs source 'local'; use 'cdl' or 'parcels'")
        if self.label_source == "cdl" and self.source != "gee":
            raise ValueError("label_source 'cdl' needs source 'gee'")
        if self.label_source == "parcels" and self.parcels is None:
            raise ValueError("label_source 'parcels' needs a 'parcels:' section (path, code_column)")
        if self.gee and (self.gee.tile_size_m / self.resolution) % 1:
            raise ValueError(f"gee.tile_size_m {self.gee.tile_size_m} is not a multiple of resolution {self.resolution}")
        if self.local:
            for t in self.local.tiles:
                if t.year not in self.years:
                    raise ValueError(f"tile {t.id} has year {t.year}, not one of years {self.years}")
        if not self.bands.all:
            raise ValueError("bands: at least one band is needed")
        if self.zones:
            crss = [z.crs for z in self.zones]
            if len(self.zones) < 2 or len(set(crss)) != len(crss):
                raise ValueError(f"zones must list two or more different UTM CRSs, got {crss}")
            for z in self.zones:
                if not (z.extent[0] < z.extent[2] and z.extent[1] < z.extent[3]):
                    raise ValueError(f"zone {z.crs} extent must be [xmin, ymin, xmax, ymax] with min < max")
        return self

    def zone_sites(self) -> list[Site]:
        """The sites exported and mapped on their own UTM grid: one per zone, or the site itself."""
        if not self.zones:
            return [self]
        return [self.model_copy(update={"name": f"{self.name}-{z.suffix}", "crs": z.crs, "extent": z.extent, "zones": [],
                                        "title": f"{self.title} ({z.crs} part)".strip()}) for z in self.zones]

    @property
    def epsg(self) -> int:
        return int(self.crs.split(":")[1])

    def resolve_year(self, year: int | None) -> int:
        if year is None:
            return self.default_year if self.default_year is not None else max(self.years)
        if year not in self.years:
            raise SiteError(
                f"site {self.name!r} has no data for year {year}",
                fix=f"use --year with one of {self.years}",
            )
        return year

    def data_root(self) -> Path:
        assert self.local is not None
        env = os.environ.get("CROPMAP_DATA_ROOT")
        root = Path(env) if env else Path(self.local.root)
        return root if root.is_absolute() else REGIONS_DIR / root


def site_dirs() -> list[Path]:
    """Where site files are looked up: ``$CROPMAP_SITES_DIR`` (if set) first, then ``regions/sites``."""
    extra = os.environ.get("CROPMAP_SITES_DIR")
    return [Path(extra), SITES_DIR] if extra else [SITES_DIR]


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


def _read_yaml(path: Path, kind: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SiteError(f"{kind} file {path} is not valid YAML{where}", fix="fix its syntax") from None
    except OSError as exc:
        raise SiteError(f"cannot read {kind} file {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise SiteError(f"{kind} file {path} must hold a mapping of fields", fix="see regions/sites/demo.yaml")
    return data


def site_path(name: str) -> Path:
    if not SITE_NAME.match(name or ""):
        raise SiteError(
            f"invalid site name {name!r}",
            fix="site names are lower-case letters, digits, '-' or '_'; `cropmap sites` lists them",
        )
    for d in site_dirs():
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    known = ", ".join(sorted(list_site_names())) or "none"
    raise SiteError(f"unknown site {name!r}", fix=f"known sites: {known} (`cropmap sites` lists them)")


def list_site_names() -> list[str]:
    names: set[str] = set()
    for d in site_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


ZONE_SITE = re.compile(r"^(?P<parent>.+)-(?P<suffix>utm\d\d[ns])$")


def load_site(name: str) -> Site:
    """Load and validate the site ``name`` (raises :class:`SiteError`); ``<site>-utmZZn`` is one
    zone of a site with ``zones`` (when no site file of that name exists)."""
    m = ZONE_SITE.match(name or "")
    if m and not any((d / f"{name}.yaml").is_file() for d in site_dirs()) and m["parent"] in list_site_names():
        parent = load_site(m["parent"])
        zone = next((z for z in parent.zone_sites() if z.name == name), None)
        if zone is None:
            known = ", ".join(z.name for z in parent.zone_sites())
            raise SiteError(f"site {m['parent']!r} has no zone {m['suffix']!r}", fix=f"use one of: {known}")
        return zone
    path = site_path(name)
    data = _read_yaml(path, "site")
    try:
        site = Site.model_validate(data)
    except ValidationError as exc:
        raise SiteError(f"site file {path} is invalid: {_format_validation(exc)}", fix="correct the field(s) named") from None
    if site.name != name:
        raise SiteError(f"site file {path} declares name {site.name!r}", fix=f"set name: {name}")
    load_legend(site.legend)  # validate eagerly: a broken legend is a broken site
    return site


def load_legend(name: str) -> Legend:
    if not SITE_NAME.match(name or ""):
        raise SiteError(f"invalid legend name {name!r}", fix="use the stem of a file in regions/legends")
    candidates = [d.parent / "legends" / f"{name}.yaml" for d in site_dirs()] + [LEGENDS_DIR / f"{name}.yaml"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SiteError(f"unknown legend {name!r}", fix=f"add regions/legends/{name}.yaml or fix the site's `legend`")
    data = _read_yaml(path, "legend")
    try:
        return Legend.model_validate(data)
    except ValidationError as exc:
        raise SiteError(f"legend file {path} is invalid: {_format_validation(exc)}", fix="correct the field(s) named") from None
