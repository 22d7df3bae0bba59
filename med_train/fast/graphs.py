"""Decoding steps on a GPU as replays of one captured CUDA graph each (`StaticSteps`), over a preallocated cache
(`caches.StaticDecoderCache`): a BERT-base decoder's step is some 300 kernel launches from Python, which bound a
GPU decode (the GPU idled most of a step); a replay is one launch. The captured steps are kept per decoder and
thread for the next decodes of the same shapes (`captured_steps`, `release_captured_steps`)."""

from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict

import torch

from med_train.cache import DecoderCache
from med_train.decode import check_cuda_graphs
from med_train.fast.caches import StaticDecoderCache

_capturing = threading.Lock()


class StaticSteps:
    """The decoding steps after the prompt over a `StaticDecoderCache`: each step (the beams' reordering of
    the cache, then the decoder on one token per row) is, on a GPU, one replay of a CUDA graph captured once,
    instead of some 300 kernel launches from Python, which bound a GPU decode (the GPU idled most of a step).
    Elsewhere (`capture=False`) the same step runs eagerly: what the tests check against the growing cache, and
    what a GPU falls back to when the capture fails.

    `step(tokens, src)` feeds `tokens` (R,) after reordering the cached rows by `src` (R,) (beams: given exactly
    when `reorders`) and returns the logits (R, V), valid until the next step."""

    def __init__(self, decoder, cache: StaticDecoderCache, *, reorders: bool, capture: bool):
        rows = cache.self_kv[0].key.shape[0]
        device = cache.position.device
        self.cache, self.reorders = cache, reorders
        self.key = None  # what `_static_steps` keeps it under: precision and weights
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.src = torch.arange(rows, device=device)
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))

        def run():
            # no cast cache: a graph must not read an autocast cache entry that is freed when autocast exits
            with torch.autocast(device.type, dtype=autocast[1], enabled=autocast[0], cache_enabled=False):
                if reorders:
                    cache.reorder(self.src)
                logits = decoder(self.tokens[:, None], cache=cache, use_cache=True).logits[:, -1]
            cache.position.add_(1)
            return logits

        self.graph = self.logits = None
        self._run = None if capture else run
        if capture:  # warm up on a side stream (library handles, kernel choices), then capture
            with _capturing:  # one capture at a time (a capture's start synchronizes the device)
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        run()
                torch.cuda.current_stream(device).wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                # thread-local: a DataLoader's pin-memory thread may allocate host memory meanwhile
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.logits = run()

    def step(self, tokens: torch.Tensor, src: torch.Tensor | None = None) -> torch.Tensor:
        self.tokens.copy_(tokens)
        if self.reorders:
            self.src.copy_(src)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


# Steps kept per decoder, in each thread's own table (two threads decoding with one decoder must not share a
# cache's buffers; a thread's table goes with it): a captioning run meets one or two batch shapes, full batches and
# the last. Each holds its cache's buffers (the image K/V: about 0.7 GB for 32 images at 384 px in bf16).
KEEP_CAPTURED = 2
_local = threading.local()


def captured_steps(decoder) -> OrderedDict:
    """This thread's kept `StaticSteps` for `decoder`, least recently used first."""
    table = getattr(_local, "table", None)
    if table is None:
        table = _local.table = weakref.WeakKeyDictionary()
    return table.setdefault(decoder, OrderedDict())


def release_captured_steps(decoder) -> None:
    """Free the CUDA graphs (and their caches' memory) that this thread captured for decoding with `decoder`."""
    table = getattr(_local, "table", None)
    if table is not None:
        table.pop(decoder, None)


def graphs_pay(decoder, device: torch.device, cuda_graphs: bool | None) -> bool:
    """Whether the steps replay a CUDA graph (`StaticSteps`): by default on a GPU, for a decoder in eval mode."""
    check_cuda_graphs(decoder, device, cuda_graphs)
    return device.type == "cuda" and not decoder.training if cuda_graphs is None else cuda_graphs


def static_steps(decoder, cache: DecoderCache, rows: torch.Tensor | None, capacity: int,
                  reorders: bool) -> StaticSteps:
    """Steps over a static copy of the prefilled `cache` (text `rows` of it; None: all), kept for later decodes of
    the same shapes, precision and weights: on a GPU a captured graph, else eager."""
    count = cache.self_kv[0][0].shape[0] if rows is None else rows.shape[0]
    device = cache.self_kv[0][0].device
    key = (reorders, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type),
           tuple(p.data_ptr() for p in decoder.parameters()))
    kept = captured_steps(decoder)
    steps = next((s for s in kept.values() if s.key == key and s.cache.fits(cache, count, capacity)), None)
    if steps is None:
        static = StaticDecoderCache.like(cache, count, capacity)
        try:
            steps = StaticSteps(decoder, static, reorders=reorders, capture=device.type == "cuda")
        except RuntimeError as err:  # a capture that this CUDA build or an op in the step refuses
            if device.type != "cuda":
                raise
            warnings.warn(f"decoding steps run eagerly: capturing them in a CUDA graph failed: {err}", stacklevel=3)
            steps = StaticSteps(decoder, static, reorders=reorders, capture=False)  # kept: no retry per batch
        steps.key = key
        kept[id(steps)] = steps
        while len(kept) > KEEP_CAPTURED:
            kept.popitem(last=False)
    kept.move_to_end(id(steps))
    steps.cache.load(cache, rows)
    return steps
