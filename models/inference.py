"""Fast inference of the pixel models: dense blocks of pixels -> padded views -> probabilities.

The reference path (:func:`cropmap.models.training.predict_proba` on a ragged :class:`Series`) loops
in Python over every pixel (its interleaved views) and every view (padding). Here the same views are
built with whole-array numpy operations from a *dense* block (pixels x dates x bands, NaN where
not observed), so building a batch costs a few passes over memory:

* :func:`dense_views`: every pixel's observed dates, cut into the same interleaved views as
  :func:`~cropmap.models.series.interleaved_views` (view ``j`` of a pixel with ``k`` views holds its
  observations ``j, j + k, ...``), normalised and padded, **sorted by length** so that a batch of
  neighbouring views is padded only to its own longest view (padding bucketed by length);
* :func:`predict_views`: batched ``torch.inference_mode`` forward passes (a batch holds views of one
  length where that fills a quarter batch: no padding, no attention mask), bfloat16 autocast and
  optional ``torch.compile`` on CUDA, pinned host memory and non-blocking copies, the views'
  probabilities averaged per pixel on the device;
* :class:`Prefetcher`: a reader thread that prepares the next blocks while the model runs on the
  current one (numpy, zarr decompression and torch release the GIL), with a bounded queue.

The maps equal the reference path's to float tolerance (``tests/models/test_inference.py``,
``tests/pipeline/levels/pixel/test_predict_fast.py``): same views, same normalisation, masked models.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["Views", "dense_views", "view_slots", "zero_absent", "predict_views", "Prefetcher", "compiled", "host_tensors", "mha_fastpath", "eval_fast", "eval_fast_path"]


@dataclass
class Views:
    """Padded, normalised views of ``n_pixels`` pixels, sorted by length (shortest first)."""

    x: np.ndarray
    """(V, T, C) float32, normalised, 0 where absent."""
    present: np.ndarray
    """(V, T, C) bool: band observed (and inside the view)."""
    days: np.ndarray
    """(V, T) float32 day offsets, 0 on padding."""
    mask: np.ndarray
    """(V, T) bool: a real observation (not padding)."""
    lengths: np.ndarray
    """(V,) int64 observations per view (non-decreasing)."""
    owner: np.ndarray
    """(V,) int64: index (among the pixels passed) of the pixel each view belongs to."""
    n_pixels: int

    def __len__(self) -> int:
        return len(self.owner)


def _with_pad_row(dense: np.ndarray) -> np.ndarray:
    """``dense`` as (P U + 1, C) rows whose last row is all NaN: free when ``dense`` was allocated with
    that spare row (:func:`cropmap.pipeline.levels.pixel.predict.dense_block` does), a copy otherwise."""
    p, u, c = dense.shape
    base = dense.base
    while base is not None and base.base is not None:
        base = base.base
    if (base is not None and base.ndim == 2 and base.shape == (p * u + 1, c) and base.dtype == dense.dtype
            and dense.__array_interface__["data"][0] == base.__array_interface__["data"][0] and np.isnan(base[-1]).all()):
        return base
    return np.concatenate([dense.reshape(p * u, c), np.full((1, c), np.nan, dense.dtype)])


def view_slots(obs: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each model view's observations are, views sorted by length (no per-pixel Python).

    ``obs`` (P, U) bool: the observed (pixel, date) pairs. A pixel with ``L`` observations gets
    ``k = ceil(L / max_len)`` views (0 when ``L = 0``), exactly those of
    :func:`~cropmap.models.series.interleaved_views`: view ``j`` holds its observations of rank
    ``j, j + k, ...``. Returns ``slot`` (V, T) int64, the index in ``flat`` of each view's
    observation (``len(flat)`` on padding), ``valid`` (V, T) bool (a real observation), the views'
    lengths (non-decreasing) and owners (pixel index), and ``flat`` = ``np.flatnonzero(obs)``
    (``pixel * U + date``). Views of equal length keep pixel order (stable sort).

    Work: per-view arithmetic (the rank of slot ``s`` of view ``j`` is ``j + s k``), one (V, T)
    index array; nothing is computed per observation but ``flatnonzero``.
    """
    p = obs.shape[0]
    length = np.count_nonzero(obs, axis=1).astype(np.int64)  # (P,)
    k = (length + (max_len - 1)) // max_len
    n_views = int(k.sum())
    flat = np.flatnonzero(obs)
    owner = np.repeat(np.arange(p, dtype=np.int64), k)
    j = np.arange(n_views, dtype=np.int64) - (np.cumsum(k) - k)[owner]
    kq = k[owner]
    vlen = (length[owner] - j + kq - 1) // np.maximum(kq, 1)
    base = (np.cumsum(length) - length)[owner] + j
    order = np.argsort(vlen, kind="stable")  # padding bucketed by length
    owner, kq, vlen, base = owner[order], kq[order], vlen[order], base[order]
    s = np.arange(max(1, int(vlen.max(initial=0))), dtype=np.int64)
    valid = s < vlen[:, None]
    slot = np.where(valid, base[:, None] + kq[:, None] * s, len(flat))
    return slot, valid, vlen, owner, flat


def zero_absent(x: np.ndarray) -> np.ndarray:
    """``present`` = not NaN, then NaN -> 0 in place, both without masked (branchy) numpy writes."""
    present = np.equal(x, x)
    torch.from_numpy(x).nan_to_num_(0.0)  # one branch-free pass (np.copyto(where=) is 10x slower on scattered gaps)
    return present


def dense_views(dense: np.ndarray, days: np.ndarray, max_len: int, mean: np.ndarray | None, std: np.ndarray | None,
                observed: np.ndarray | None = None) -> Views:
    """The model views of the pixels of a dense block, vectorised (no per-pixel Python).

    ``dense`` (P, U, C) float32 band values with NaN where not observed (already normalised when
    ``mean`` / ``std`` are None); ``days`` (U,) the dates shared by the block; ``observed`` (P, U)
    bool, default: any band observed. A pixel with ``L`` observations gets ``k = ceil(L / max_len)``
    views (0 when ``L = 0``), exactly those of :func:`~cropmap.models.series.interleaved_views`
    (:func:`view_slots`).

    Work: index arithmetic per view, then one gather of whole band rows into the padded (V, T, C)
    batch (padding points at a NaN row), one pass for ``present`` and one to zero the gaps; the
    values are never scattered one by one.
    """
    p, u, c = dense.shape
    obs = ~np.isnan(dense).all(axis=2) if observed is None else np.asarray(observed, bool)
    slot, valid, vlen, owner, flat = view_slots(obs, max_len)
    pad = p * u  # index of the all-NaN row appended below
    src = np.append(flat, pad).take(slot)
    rows = _with_pad_row(dense)
    x = np.take(rows, src, axis=0)
    if mean is not None:
        x -= np.asarray(mean, np.float32)
        x /= np.asarray(std, np.float32)
    present = zero_absent(x)
    day_of = np.zeros(p * u + 1, np.float32)  # the day of each (pixel, date) row: a broadcast, cheaper than flat % U
    day_of[:-1].reshape(p, u)[:] = np.asarray(days, np.float32)
    return Views(x, present, day_of.take(src), valid, vlen, owner, p)


def compiled(model: nn.Module, device: str, enabled: bool) -> nn.Module:
    """``torch.compile`` (dynamic shapes: bucketed lengths vary) when asked for and on CUDA; else the model."""
    if not (enabled and str(device).startswith("cuda")):
        return model
    return torch.compile(model, dynamic=True)


def _batches(v: Views, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, padded length) of each batch: consecutive sorted views, padded to the batch's longest.

    A batch ends where the view length changes when that leaves at least a quarter batch: most
    batches then hold views of one length, with no padding at all (no attention mask, no boolean
    indexing of tokens; see :func:`cropmap.models.pixel.stnet.encoder_layer_eval`)."""
    n, lengths = len(v), v.lengths
    floor = max(1, batch_size // 4)
    s = 0
    while s < n:
        e = min(n, s + batch_size)
        if lengths[e - 1] != lengths[s]:
            run = int(np.searchsorted(lengths, lengths[s], side="right"))  # end of the first length's run
            last = int(np.searchsorted(lengths, lengths[e - 1], side="left"))  # start of the last length's run
            if run - s >= floor:
                e = run
            elif last - s >= floor:
                e = last
        yield s, e, max(1, int(lengths[e - 1]))
        s = e


def host_tensors(v: Views, s: int, e: int, t: int, pin: bool) -> dict[str, torch.Tensor]:
    """Batch ``[s, e)`` cut to its own length ``t`` as (optionally pinned) CPU tensors."""
    out = {"x": torch.from_numpy(np.ascontiguousarray(v.x[s:e, :t])),
           "present": torch.from_numpy(np.ascontiguousarray(v.present[s:e, :t])),
           "days": torch.from_numpy(np.ascontiguousarray(v.days[s:e, :t])),
           "mask": torch.from_numpy(np.ascontiguousarray(v.mask[s:e, :t]))}
    return {k: a.pin_memory() for k, a in out.items()} if pin else out


_EVAL_FAST = threading.local()


def eval_fast_path() -> bool:
    """Whether a model forward runs inside :func:`predict_views` (models may then take inference-only shortcuts
    that give the same outputs to float noise, e.g. :func:`cropmap.models.pixel.stnet.encoder_layer_eval`)."""
    return getattr(_EVAL_FAST, "on", False)


class eval_fast:  # noqa: N801 - used as a context manager
    """Turn :func:`eval_fast_path` on (this thread) for the forward passes of :func:`predict_views`; the
    reference ``predict_proba`` and training never see it."""

    def __enter__(self) -> None:
        self.before = eval_fast_path()
        _EVAL_FAST.on = True

    def __exit__(self, *exc) -> None:
        _EVAL_FAST.on = self.before


class mha_fastpath:  # noqa: N801 - used as a context manager
    """Turn the fused eval "fast path" of ``nn.MultiheadAttention`` / ``TransformerEncoderLayer`` on or off.

    On CPU the fused kernel (nested tensors for the padding mask) is slower than the plain ops on
    length-bucketed batches, whose padding is small: 135 vs 90 ms CPU time for an STNet layer on
    512 x 30 tokens (``benchmarks/throughput.py`` measures whole models both ways)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.before = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(self.enabled)

    def __exit__(self, *exc) -> None:
        torch.backends.mha.set_fastpath_enabled(self.before)


def predict_views(model: nn.Module, v: Views, batch_size: int = 512, device: str = "cpu", amp: bool = True,
                  host: list[dict[str, torch.Tensor]] | None = None, fastpath: bool | None = None) -> np.ndarray:
    """Class probabilities (n_pixels, K) float32: softmax of each view, averaged over a pixel's views.

    ``model`` must be on ``device`` and in eval mode. ``host``: the batches as prepared by
    :func:`host_tensors` (the prefetching reader pins them off the critical path); built here otherwise.
    ``fastpath``: the fused attention kernel (default: on CUDA only, see :class:`mha_fastpath`).
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    acc = None
    with torch.inference_mode(), mha_fastpath(cuda if fastpath is None else fastpath), eval_fast():
        owner = torch.from_numpy(v.owner).to(dev)
        for i, (s, e, t) in enumerate(_batches(v, batch_size)):
            hb = host[i] if host is not None else host_tensors(v, s, e, t, pin=cuda)
            batch = {k: a.to(dev, non_blocking=cuda) for k, a in hb.items()}
            if amp and cuda:
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    logits = model(**batch)
            else:
                logits = model(**batch)
            p = torch.softmax(logits.float(), dim=-1).double()
            if acc is None:
                acc = torch.zeros((v.n_pixels, p.shape[1]), dtype=torch.float64, device=dev)
            acc.index_add_(0, owner[s:e], p)
        if acc is None:
            return np.zeros((v.n_pixels, 0), np.float32)
        count = torch.bincount(owner, minlength=v.n_pixels).clamp_min(1).to(acc.dtype)
        return (acc / count[:, None]).float().cpu().numpy()


class Prefetcher:
    """Run ``produce(item)`` for each item on a reader thread, at most ``depth`` results ahead.

    Iterating yields the results in order; an exception in the reader is re-raised in the consumer.
    ``close()`` (or leaving a ``with`` block) stops the reader early.
    """

    _END = object()

    def __init__(self, items: Iterable, produce: Callable, depth: int = 2) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._items, self._produce = items, produce
        self._thread = threading.Thread(target=self._run, name="cropmap-prefetch", daemon=True)
        self._thread.start()

    def _put(self, obj) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set() or not self._put(("ok", self._produce(item))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(("err", exc))
            return
        self._put(("end", self._END))

    def __iter__(self) -> Iterator:
        while True:
            kind, obj = self._q.get()
            if kind == "end":
                return
            if kind == "err":
                raise obj
            yield obj

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
