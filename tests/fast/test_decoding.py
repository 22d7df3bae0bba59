"""The fast decoding routes (`fast.decoding.FastDecoding`) give the plain decoder's captions: each route the fast
package can choose, forced in turn (the few-row kernel on or off, prepacked products, the history cache, folded
image projections, static steps), against an unprepared twin; and
what each route keeps (static steps per shape and thread, CUDA graphs on a GPU)."""

import copy
from dataclasses import dataclass

import pytest
import torch
from test_decode import BOS, EOS, PAD, _padded_images, _plain_decoder, _plain_ending_decoder, watch_steps

from med_train import fast
from med_train.decode import Decoding, Steps, generate
from med_train.fast import attention, decoding, few_rows, graphs, ops
from med_train.fast.caches import FastDecoderCache, HistoryCache, ImageTokens
from med_train.fast.decoding import FastDecoding

HEADS = 2  # test_decode's decoders'


def _twins():
    """The decoder whose captions end at different steps, plain, and a copy prepared with the fast paths."""
    plain = _plain_ending_decoder()
    prepared = copy.deepcopy(plain)
    fast.prepare(prepared, "cpu", "decode", enabled_here=True)
    return plain, prepared


def _force_static_steps(monkeypatch):
    """The steps a GPU captures in a CUDA graph (`StaticSteps`), here run eagerly: wherever a decode may take them
    (not where it asks for eager steps: `cuda_graphs=False`, as a beam search that drops finished images does)."""
    monkeypatch.setattr(decoding, "graphs_pay", lambda decoder, device, cuda_graphs: cuda_graphs is not False)


@dataclass(frozen=True)
class Route:
    """One way the fast package can run a CPU decode: `history` None leaves the choice to `history_pays`."""

    few_rows: bool = True
    packed: bool = True
    history: bool | None = None
    folding: bool = False
    static: bool = False

    def take(self, monkeypatch):
        monkeypatch.setattr(ops.ROUTES, "few_rows", self.few_rows)
        monkeypatch.setattr(ops.ROUTES, "packed_few", self.packed)
        monkeypatch.setattr(ops.ROUTES, "packed_many", self.packed)
        if self.history is not None:
            monkeypatch.setattr(attention, "history_pays", lambda *a: self.history)
        monkeypatch.setattr(attention, "FOLD_BELOW", 1e9 if self.folding else 0.0)  # always or never pays
        if self.static:
            _force_static_steps(monkeypatch)

    def seen(self, eager: bool) -> tuple:
        """What each step shows: the steps' class, its cache's, its first cross-attention entry's.
        `eager`: a decode that asks for eager steps (no static ones)."""
        if self.static and not eager:
            return graphs.StaticSteps, graphs.StaticDecoderCache, tuple
        entry = ImageTokens if self.folding else tuple
        if self.few_rows and self.history is not False:
            return Steps, HistoryCache, entry
        return Steps, FastDecoderCache, entry

    def kept(self) -> set:
        """The weight layouts a decode's linears keep: the few-row kernel's panels (those of the folded products
        too), else oneDNN's fp32 prepacked weights, else none."""
        if self.few_rows:
            return {ops.FEW_ROWS} | ({("folded carry", HEADS), ("folded back", HEADS)} if self.folding else set())
        return {torch.float32} if self.packed else set()


CPU_ROUTES = {
    "history cache": Route(history=True),
    "history cache, folded": Route(history=True, folding=True),
    "growing cache": Route(history=False),
    "growing cache, folded": Route(history=False, folding=True),
    "no kernel": Route(few_rows=False),
    "no kernel, folded": Route(few_rows=False, folding=True),
    "no kernel, nothing prepacked": Route(few_rows=False, packed=False),
    "static steps": Route(static=True),
}
needs_kernel = pytest.mark.skipif(not few_rows.available(), reason="the few-row kernel is not built here")
ROUTE_PARAMS = [pytest.param(route, id=name, marks=[needs_kernel] if route.few_rows else [])
                for name, route in CPU_ROUTES.items()]

MODES = [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, drop_finished=False),
         dict(num_beams=3, drop_finished=False, early_stopping="never"), dict(do_sample=True, top_p=0.9),
         dict(num_beams=5, length_penalty=0.5, min_length=6), dict(num_beams=3, min_length=0, repetition_penalty=1.5,
                                                                     early_stopping="never")]


def _caption(decoder, images, mask, **kwargs):
    kwargs = {"min_length": 3, **kwargs}
    generator = torch.Generator().manual_seed(7) if kwargs.get("do_sample") else None
    return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                    image_mask=mask, generator=generator, **kwargs)


def _kept_layouts(decoder) -> set:
    return {layout for m in decoder.modules() if isinstance(m, ops.FastLinear)
            for layout, copy_ in m.__dict__.get("_kept", {}).items() if copy_ is not None}


@pytest.mark.parametrize("kwargs", MODES, ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()))
@pytest.mark.parametrize("route", ROUTE_PARAMS)
def test_every_route_gives_the_plain_decoders_captions(monkeypatch, route, kwargs):
    """Greedy, beam search (images leaving the batch or not, exact early stopping, length and repetition
    penalties) and sampling, over images with a masked padding: each route's steps run as the route says (the
    cache and steps it keeps, the kernel's beam candidates, its kept weights) and give the plain decoder's captions
    of different lengths."""
    plain, prepared = _twins()
    images, mask = _padded_images()
    want = _caption(plain, images, mask, **kwargs)
    route.take(monkeypatch)
    seen, candidates = [], []
    watch_steps(monkeypatch, lambda steps, tokens: seen.append(
        (type(steps), type(steps.cache), type(steps.cache.cross_kv[0]))))
    real_candidates = few_rows.beam_candidates
    monkeypatch.setattr(few_rows, "beam_candidates", lambda *a: candidates.append(1) or real_candidates(*a))
    got = _caption(prepared, images, mask, **kwargs)
    beams = kwargs.get("num_beams", 1) > 1 and not kwargs.get("do_sample")
    eager = beams and kwargs.get("drop_finished", True)
    assert set(seen) == {route.seen(eager)}
    assert bool(candidates) == (beams and route.few_rows)
    assert _kept_layouts(prepared) == route.kept()
    assert torch.equal(got, want)
    assert len({int((row != PAD).sum()) for row in got}) > 1  # captions of different lengths


@pytest.mark.parametrize("kwargs", [dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_p=0.9)])
@pytest.mark.parametrize("route", ROUTE_PARAMS)
def test_a_length_limit_within_the_prompt_returns_the_prompt_on_every_route(monkeypatch, route, kwargs):
    """`max_length` at or under the prompt's length: no step runs, whatever the route keeps for them."""
    _, prepared = _twins()
    images, _ = _padded_images()
    route.take(monkeypatch)
    prompt = torch.tensor([BOS, 7, 8])
    for max_length in (1, 3):
        ids = generate(prepared, images, prompt, eos_token_id=EOS, pad_token_id=PAD, max_length=max_length, **kwargs)
        assert torch.equal(ids, prompt.expand(len(images), -1))


@needs_kernel
@pytest.mark.parametrize("kwargs", [dict(num_beams=3), dict(num_beams=5, length_penalty=0.5, min_length=6),
                                    dict(num_beams=3, repetition_penalty=1.5, early_stopping="never")])
def test_beam_candidates_from_the_kernel_give_the_same_captions(monkeypatch, kwargs):
    """On the CPU a beam step's candidates come from one kernel pass over the logits (`few_rows.beam_candidates`:
    each row's ending score and k best, then each image's k best of its rows'): the captions are those of
    log_softmax and a top-k over each image's k x V running sums, and the plain decoder's."""
    calls = []
    real = few_rows.beam_candidates
    monkeypatch.setattr(few_rows, "beam_candidates", lambda *a: calls.append(1) or real(*a))
    plain, prepared = _twins()
    images, mask = _padded_images()

    def run(decoder, kernel: bool):
        monkeypatch.setattr(FastDecoding, "beam_candidates",
                            FastDecoding.beam_candidates if kernel else Decoding.beam_candidates)
        calls.clear()
        return _caption(decoder, images, mask, **{"min_length": 0, **kwargs}), len(calls)

    kernel, kernel_calls = run(prepared, True)
    (torch_path, torch_calls), (want, plain_calls) = run(prepared, False), run(plain, True)
    assert kernel_calls > 0 and torch_calls == plain_calls == 0
    assert torch.equal(kernel, torch_path) and torch.equal(kernel, want)
    assert len({int((row != PAD).sum()) for row in kernel}) > 1  # captions of different lengths


@needs_kernel
def test_the_history_cache_is_for_decoding_in_fp32_only():
    """Decoding's own conditions: no gradient, eval mode (no attention dropout), fp32."""
    _, decoder = _twins()
    images, _ = _padded_images()
    with torch.no_grad():
        assert attention.history_pays(decoder, images) and not attention.history_pays(decoder, images.double())
        assert not attention.history_pays(decoder.train(), images)
    assert not attention.history_pays(decoder.eval(), images)  # gradients recorded


def test_static_steps_are_kept_for_the_next_decode_of_their_shapes(monkeypatch):
    """A decode reuses the kept steps (and cache buffers) of the last decode of the same shapes and precision,
    loading the new prefill into them; a new shape adds steps, the least recently used go beyond KEEP_CAPTURED;
    `release_captured_steps` (and `fast.release`) drops them. (On a GPU the kept steps hold a captured graph; here
    they run eagerly.)"""
    _force_static_steps(monkeypatch)
    plain, decoder = _twins()
    first, mask = _padded_images()
    second = _padded_images(seed=7)[0]

    def run(images, beams=3, graphs=None, decoder=decoder):
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                        min_length=3, image_mask=mask[: len(images)], num_beams=beams, drop_finished=False,
                        cuda_graphs=graphs)

    graphs.release_captured_steps(decoder)
    assert torch.equal(run(first), run(first, graphs=False))
    assert torch.equal(run(first), run(first, decoder=plain))
    kept = list(graphs.captured_steps(decoder).values())
    assert len(kept) == 1
    assert torch.equal(run(second), run(second, graphs=False))  # the same buffers, the second batch's prefill
    assert torch.equal(run(second), run(second, decoder=plain))
    assert list(graphs.captured_steps(decoder).values()) == kept
    run(first[:3])
    run(first)  # used again: now the most recent
    run(first[:2])  # a third shape: the least recently used (3 images) goes
    assert len(graphs.captured_steps(decoder)) == graphs.KEEP_CAPTURED
    assert kept[0] in graphs.captured_steps(decoder).values()
    assert {s.cache.self_kv[0].key.shape[0] for s in graphs.captured_steps(decoder).values()} == {15, 6}
    graphs.release_captured_steps(decoder)
    assert not graphs.captured_steps(decoder)
    run(first)
    fast.release(decoder)
    assert not graphs.captured_steps(decoder)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_threads_decoding_with_one_decoder_get_their_own_captions(monkeypatch, device):
    """Two threads captioning with one decoder at once, same shapes: each thread keeps its own steps and cache
    buffers (on a GPU, its own captured graph), so neither reads the other's (shared ones would mix their images'
    captions). On the CPU the static steps are forced, eager."""
    import threading

    if device == "cpu":
        _force_static_steps(monkeypatch)
    plain = _plain_ending_decoder()
    decoder = copy.deepcopy(plain)
    fast.prepare(decoder, device, "decode", enabled_here=True)
    _, mask = _padded_images()
    plain, decoder, mask = plain.to(device), decoder.to(device), mask.to(device)
    batches = [_padded_images(seed=seed)[0].to(device) for seed in (6, 7)]

    def run(images, graphs, decoder=decoder):
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                        min_length=3, image_mask=mask, num_beams=3, drop_finished=False, cuda_graphs=graphs)

    want = [run(images, False) for images in batches]
    assert not torch.equal(want[0], want[1])
    assert all(torch.equal(ids, run(images, None, plain)) for ids, images in zip(want, batches, strict=True))
    start, got, kept = threading.Barrier(2), [[], []], [None, None]

    def work(i):
        start.wait()
        got[i] += [run(batches[i], None) for _ in range(20)]
        kept[i] = list(graphs.captured_steps(decoder).values())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for mine, expected in zip(got, want, strict=True):
        assert len(mine) == 20 and all(torch.equal(ids, expected) for ids in mine)
    assert len(kept[0]) == len(kept[1]) == 1 and kept[0][0] is not kept[1][0]  # one each
    assert not graphs.captured_steps(decoder)  # this thread decoded nothing through them


def _on_gpu(decoder):
    """`decoder` prepared for the GPU, and moved there."""
    fast.prepare(decoder, "cuda", "decode", enabled_here=True)
    return decoder.cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_give_the_same_captions():
    """On a GPU the steps replay one captured CUDA graph: the captions of eager steps, and of the plain decoder, in
    fp32; the graph is kept and replayed for the next decode of the same shapes (new images), also under bf16
    autocast after the autocast that captured it has ended (the graph reads no autocast cache); at most
    KEEP_CAPTURED graphs are kept."""
    plain = _plain_ending_decoder()
    decoder = _on_gpu(copy.deepcopy(plain))
    plain = plain.cuda()
    first, mask = _padded_images()
    batches = [first.cuda(), _padded_images(seed=7)[0].cuda()]
    mask = mask.cuda()

    def run(images, graphs, decoder=decoder, **kwargs):
        generator = torch.Generator("cuda").manual_seed(7) if kwargs.get("do_sample") else None
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=12,
                        min_length=3, image_mask=mask[: len(images)], generator=generator, cuda_graphs=graphs,
                        **kwargs)

    for kwargs in (dict(num_beams=1), dict(num_beams=3), dict(do_sample=True, top_p=0.9)):
        graphs.release_captured_steps(decoder)
        for images in batches:  # the first captures, the second replays the kept graph
            graphed = run(images, True, **kwargs)
            assert torch.equal(graphed, run(images, False, **kwargs)), kwargs
            assert torch.equal(graphed, run(images, None, plain, **kwargs)), kwargs
        assert len(graphs.captured_steps(decoder)) == 1
    agree = []
    for images in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            graphed = run(images, None, num_beams=3)  # the default on a GPU
            eager = run(images, False, num_beams=3)
        torch.randn(1 << 24, device="cuda")  # reuse freed memory
        agree += (graphed == eager).all(1).tolist()
    assert sum(agree) >= 0.8 * len(agree)  # bf16: attention kernels that differ may break a near-tie differently
    run(batches[0][:3], None, num_beams=2)
    run(batches[0][:2], None, num_beams=2)  # a third shape: the oldest graph goes
    assert len(graphs.captured_steps(decoder)) == graphs.KEEP_CAPTURED
    graphs.release_captured_steps(decoder)
    assert not graphs.captured_steps(decoder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_step_that_cannot_be_captured_runs_eagerly_with_a_warning(monkeypatch):
    """A step that a CUDA graph cannot hold (here: one that reads a value back to the host mid-step) is run
    eagerly over the static cache, with a warning, and gives the same captions; the GPU stays usable."""
    decoder = _on_gpu(_plain_decoder(vocab=30, seed=5))
    images = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(6)).cuda()

    def run(graphs):
        return generate(decoder, images, torch.tensor([BOS, 7]), eos_token_id=EOS, pad_token_id=PAD, max_length=10,
                        num_beams=3, cuda_graphs=graphs)

    want = run(False)
    monkeypatch.setattr(decoder, "forward", _syncing(decoder.forward, decoder))
    graphs.release_captured_steps(decoder)
    with pytest.warns(UserWarning, match="run eagerly"):
        got = run(None)
    assert torch.equal(got, want)
    assert torch.equal(run(None), want)  # kept: no second capture, no second warning needed


def _syncing(forward, decoder):
    def call(*args, **kwargs):
        decoder.cls.predictions.bias.sum().item()  # a host read-back: not allowed while a graph is captured
        return forward(*args, **kwargs)
    return call
