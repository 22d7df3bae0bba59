"""The few-row product kernel (few_rows.py, few_rows.cpp): built where it can be, by `build()` alone, as torch
operators the profiler and torch.compile see; equal to F.linear, routed to by ops.linear for a decoding step's
rows, and out of the way where it cannot be built."""

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

from med_train.fast import few_rows, ops

buildable = few_rows.missing() is None
needs_kernel = pytest.mark.skipif(not buildable, reason=f"the few-row kernel cannot be built: {few_rows.missing()}")


def test_the_kernel_is_built_wherever_it_can_be():
    """On a machine that can build it (CI's can), the test run's `build()` (conftest, as `med eval` does) must have
    loaded it: a silent fallback would hide a broken build behind oneDNN's slower products."""
    assert few_rows.available() == buildable


@needs_kernel
@pytest.mark.parametrize("outputs,width", [(768, 768), (50, 7), (30524, 64), (97, 130), (1, 1)])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 24, 64, 70])
def test_equals_f_linear(outputs, width, rows):
    """Every row count (blocks of 8 and a remainder), outputs that fill the last 48-wide panel or not, with and
    without a bias."""
    torch.manual_seed(rows)
    weight, bias, x = torch.randn(outputs, width), torch.randn(outputs), torch.randn(rows, width)
    panels = few_rows.pack(weight.t())
    assert panels.shape == (-(-outputs // few_rows.PANEL), width, few_rows.PANEL)
    for b in (bias, None):
        expected = F.linear(x, weight, b)
        torch.testing.assert_close(few_rows.linear(x, panels, outputs, b), expected, atol=1e-4, rtol=1e-5)


@needs_kernel
def test_leading_dimensions_strided_input_and_threads():
    """x (B, T, K), a non-contiguous view, as F.linear takes it; the result does not depend on the thread count
    (each output is one thread's, summed in the same order) nor on the calling thread."""
    torch.manual_seed(0)
    weight, bias = torch.randn(200, 96), torch.randn(200)
    x = torch.randn(96, 4, 5).permute(1, 2, 0)  # (4, 5, 96), not contiguous
    panels = few_rows.pack(weight.t())
    y = few_rows.linear(x, panels, 200, bias)
    assert y.shape == (4, 5, 200)
    torch.testing.assert_close(y, F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = few_rows.linear(x, panels, 200, bias)
        torch.set_num_threads(2)
        two = few_rows.linear(x, panels, 200, bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, y)
    elsewhere = {}
    worker = threading.Thread(target=lambda: elsewhere.update(y=few_rows.linear(x, panels, 200, bias)))
    worker.start()
    worker.join()
    assert torch.equal(elsewhere["y"], y)


@needs_kernel
def test_bad_arguments_are_named():
    panels = few_rows.pack(torch.randn(8, 10))
    with pytest.raises(ValueError, match="not pack.*10 outputs"):
        few_rows.linear(torch.randn(2, 9), panels, 10)
    with pytest.raises(ValueError, match="float64"):
        few_rows.linear(torch.randn(2, 8, dtype=torch.float64), panels, 10)
    with pytest.raises(ValueError, match="not pack"):
        few_rows.linear(torch.randn(2, 8), panels, 100)
    with pytest.raises(ValueError, match=r"bias must be fp32 \(10,\)"):
        few_rows.linear(torch.randn(2, 8), panels, 10, torch.randn(11))
    with pytest.raises(ValueError, match=r"x \(B, M, K\)"):
        few_rows.matmul(torch.randn(3, 8), panels, 10)
    with pytest.raises(ValueError, match="not pack"):
        few_rows.matmul(torch.randn(2, 3, 8), panels, 10)  # one matrix for a batch of two


@needs_kernel
@pytest.mark.parametrize("shape", [(96, 3, 64, 197), (96, 3, 197, 64), (8, 12, 768, 197), (2, 70, 5, 1),
                                   (3, 9, 33, 48)])
def test_matmul_equals_bmm(shape):
    """A batch of products x[i] @ b[i] with b[i] packed (any source layout: a transposed view too); outputs that
    fill the last 48-wide panel or not."""
    batch, rows, k, n = shape
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(batch, rows, k, generator=g)
    for b in (torch.randn(batch, k, n, generator=g), torch.randn(batch, n, k, generator=g).transpose(1, 2)):
        torch.testing.assert_close(few_rows.matmul(x, few_rows.pack(b), n), torch.bmm(x, b), atol=1e-4, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", [(8, 12, 3, 197, 64), (2, 3, 5, 17, 40), (1, 2, 1, 1, 8), (3, 2, 9, 100, 70),
                                   (2, 2, 4, 96, 16), (1, 1, 2, 300, 3)])
@pytest.mark.parametrize("masked", ["none", "per image", "full"])
@pytest.mark.parametrize("threads", [1, 2])
def test_attend_equals_sdpa(shape, masked, threads):
    """softmax(q k^T / sqrt(d) + mask) v per (batch, head) for any rows (blocks of 4 and a remainder), keys that
    fill their last 16-wide vector or not, head widths under and over 64, a mask broadcast over heads and rows or
    full (with hidden keys), strided inputs, one thread or two."""
    b, h, r, s, d = shape
    g = torch.Generator().manual_seed(s)
    q, k, v = torch.randn(b, h, r, d, generator=g), torch.randn(b, h, s, d, generator=g), torch.randn(b, h, s, d,
                                                                                                      generator=g)
    mask = {"none": None, "per image": torch.randn(b, 1, 1, s, generator=g),
            "full": torch.randn(b, h, r, s, generator=g)}[masked]
    if mask is not None and s > 1:
        mask[..., s // 2] = torch.finfo(torch.float32).min
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = few_rows.attend(q, k.transpose(-1, -2).contiguous(), v, mask)
        strided = few_rows.attend(q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(-1, -2), v, mask)
    finally:
        torch.set_num_threads(before)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strided, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(few_rows.attend(q, k.transpose(-1, -2), v, mask, scale=0.5),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5), atol=1e-5, rtol=1e-5)
    rows_first = torch.full((b, r, h, d), float("nan"))  # written through a heads-first view: (B, H, R, D) strided
    returned = few_rows.attend(q, k.transpose(-1, -2), v, mask, out=rows_first.transpose(1, 2))
    assert returned.data_ptr() == rows_first.data_ptr()
    torch.testing.assert_close(rows_first.transpose(1, 2), want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_attend_refuses_what_it_cannot_take():
    q, kt, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 8, 5), torch.randn(2, 3, 5, 8)
    with pytest.raises(ValueError, match="keys_t"):
        few_rows.attend(q, kt.transpose(-1, -2), v)
    with pytest.raises(ValueError, match="fp32"):
        few_rows.attend(q.double(), kt, v)
    with pytest.raises(ValueError, match="fp32"):
        few_rows.attend(q, kt, v, torch.zeros(2, 1, 1, 5, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="4-d"):
        few_rows.attend(q[0], kt, v)
    with pytest.raises(RuntimeError):  # a mask that does not broadcast
        few_rows.attend(q, kt, v, torch.zeros(2, 1, 1, 6))
    with pytest.raises(ValueError, match="out must be"):
        few_rows.attend(q, kt, v, out=torch.empty(2, 3, 8, 4).transpose(-1, -2))


@needs_kernel
@pytest.mark.parametrize("shape", [(24, 12, 64, 20, 24, 17), (5, 3, 40, 9, 7, 9), (2, 1, 8, 4, 2, 1),
                                   (3, 2, 70, 6, 5, 4), (4, 2, 16, 40, 4, 33)])
@pytest.mark.parametrize("threads", [1, 2])
def test_attend_history_equals_sdpa_over_each_rows_history(shape, threads):
    """One query per row attends over its own history, gathered from a store that was never reordered: position p
    of row r from stored row source[r, p]; BERT's 64-wide heads (registers, unmasked) and other widths."""
    rows, heads, width, capacity, stored, length = shape
    g = torch.Generator().manual_seed(length)
    q = torch.randn(rows, heads, width, generator=g)
    keys, values = (torch.randn(capacity, stored, heads, width, generator=g) for _ in range(2))
    source = torch.randint(0, stored, (rows, length), generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = few_rows.attend_history(q, keys, values, source)
        scaled = few_rows.attend_history(q, keys, values, source, scale=0.3)
    finally:
        torch.set_num_threads(before)
    positions = torch.arange(length)[None]
    k, v = (t[positions, source].transpose(1, 2) for t in (keys, values))  # (R, H, T, D)
    want = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled, F.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.3)[:, :, 0],
                               atol=1e-5, rtol=1e-5)


@needs_kernel
def test_attend_history_refuses_what_it_cannot_take():
    q, keys = torch.randn(2, 3, 8), torch.randn(5, 4, 3, 8)
    source = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="source rows"):
        few_rows.attend_history(q, keys, keys, source + 4)
    with pytest.raises(ValueError, match="int64"):
        few_rows.attend_history(q, keys, keys, source.int())
    with pytest.raises(ValueError, match="int64"):
        few_rows.attend_history(q, keys, keys, torch.zeros(2, 6, dtype=torch.long))  # more positions than stored
    with pytest.raises(ValueError, match="query"):
        few_rows.attend_history(q[:, :2], keys, keys, source)
    with pytest.raises(ValueError, match="strides"):
        few_rows.attend_history(q, keys, keys.transpose(0, 1).contiguous().transpose(0, 1), source)
    with pytest.raises(ValueError, match="fp32"):
        few_rows.attend_history(q.double(), keys.double(), keys.double(), source)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 8, 24, 70])
def test_product_with_gelu_and_into_a_given_tensor(rows):
    """`Product` (a weight's panels and bias bound) equals F.linear, with `gelu=True` F.gelu of it (BERT's erf GELU,
    applied as the kernel stores each output: every panel, the partial last one too), also into a given `out`
    such as a cache's slot; GELU itself within float rounding over a wide range of inputs."""
    g = torch.Generator().manual_seed(rows)
    weight, bias, x = torch.randn(100, 64, generator=g) / 8, torch.randn(100, generator=g), torch.randn(rows, 64,
                                                                                                     generator=g)
    product = few_rows.Product(few_rows.pack(weight.t()), 100, bias)
    torch.testing.assert_close(product(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(product(x, gelu=True), F.gelu(F.linear(x, weight, bias)), atol=1e-5, rtol=1e-5)
    slot = torch.full((2, rows, 100), float("nan"))
    assert product(x, out=slot[1], gelu=True).data_ptr() == slot[1].data_ptr()
    torch.testing.assert_close(slot[1], F.gelu(F.linear(x, weight, bias)), atol=1e-5, rtol=1e-5)
    assert slot[0].isnan().all()  # nothing written outside
    identity = few_rows.Product(few_rows.pack(torch.ones(1, 1)), 1)
    points = torch.linspace(-12, 12, 20001)[:, None]
    torch.testing.assert_close(identity(points, gelu=True), F.gelu(points), atol=2e-6, rtol=1e-6)


@needs_kernel
def test_product_and_norm_refuse_what_they_cannot_take():
    product = few_rows.Product(few_rows.pack(torch.randn(5, 3).t()), 5, torch.zeros(5))
    with pytest.raises(ValueError, match=r"\(R, 3\)"):
        product(torch.randn(2, 4))
    with pytest.raises(ValueError, match="contiguous fp32"):
        product(torch.randn(3, 2).t())
    with pytest.raises(ValueError, match="out must be"):
        product(torch.randn(2, 3), out=torch.empty(2, 4))
    with pytest.raises(ValueError, match="bias"):
        few_rows.Product(few_rows.pack(torch.randn(5, 3).t()), 5, torch.zeros(4))
    with pytest.raises(ValueError, match="panels"):
        few_rows.Product(few_rows.pack(torch.randn(5, 3).t()), 49)
    norm = few_rows.Norm(torch.ones(4), torch.zeros(4), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        norm(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\(R, 4\)"):
        norm(torch.randn(2, 5))
    with pytest.raises(ValueError, match="fp32"):
        few_rows.Norm(torch.ones(4, dtype=torch.float64), torch.zeros(4), 1e-5)


@needs_kernel
@pytest.mark.parametrize("width", [768, 32, 7, 100])
def test_norm_equals_layer_norm_of_the_sum(width):
    """`Norm(weight, bias, eps)(x, residual)` is F.layer_norm(x + residual) (or of x alone), for widths that fill
    their last 16-wide vector or not, rows far from zero mean, and when it writes over nothing it reads."""
    g = torch.Generator().manual_seed(width)
    x, residual = 3 * torch.randn(5, width, generator=g) + 2, torch.randn(5, width, generator=g)
    weight, bias = torch.randn(width, generator=g), torch.randn(width, generator=g)
    for eps in (1e-12, 1e-5):
        norm = few_rows.Norm(weight, bias, eps)
        torch.testing.assert_close(norm(x, residual), F.layer_norm(x + residual, (width,), weight, bias, eps),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(norm(x), F.layer_norm(x, (width,), weight, bias, eps), atol=1e-5, rtol=1e-5)
    assert norm(x[:0]).shape == (0, width)


@needs_kernel
@pytest.mark.parametrize("rows,vocab,k", [(24, 30524, 3), (6, 50, 5), (4, 17, 16), (3, 5, 1), (5, 40, 39)])
@pytest.mark.parametrize("threads", [1, 2])
def test_beam_candidates_equal_log_softmax_and_top_k(rows, vocab, k, threads):
    """Each row's ending score (beam score + log-probability of eos) and its k best other continuations, as
    log_softmax, a sum and top-k give them: dead beams (-inf scores), a forbidden eos (-inf logit), repeated
    logits (ties go to the lower token), vocabularies that fill their last 16-wide vector or not, strided rows."""
    g = torch.Generator().manual_seed(vocab + k)
    logits = (3 * torch.randn(rows, vocab + 3, generator=g))[:, :vocab]  # rows at a stride of their own
    logits[:, vocab // 2] = logits[:, 1]  # ties
    logits[0, 2] = float("-inf")
    beam_scores = torch.randn(rows, generator=g)
    beam_scores[1:2] = float("-inf")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ending, scores, tokens = few_rows.beam_candidates(logits, beam_scores, 2, k)
        no_eos = few_rows.beam_candidates(logits, beam_scores, None, k)
    finally:
        torch.set_num_threads(before)
    sums = beam_scores[:, None] + logits.log_softmax(-1)
    torch.testing.assert_close(ending, sums[:, 2], atol=1e-5, rtol=1e-6)
    assert no_eos[0].isneginf().all()
    for eos, (got_scores, got_tokens) in ((2, (scores, tokens)), (None, no_eos[1:])):
        candidates = sums.clone()
        if eos is not None:
            candidates[:, eos] = float("-inf")
        want_scores, _ = candidates.topk(k, dim=1)
        alive = beam_scores > float("-inf")
        torch.testing.assert_close(got_scores[alive], want_scores[alive], atol=1e-5, rtol=1e-6)
        assert got_scores[~alive].isneginf().all()
        # the tokens are the ones scored, best first, the lower token first among equals, never eos
        torch.testing.assert_close(candidates.gather(1, got_tokens)[alive], got_scores[alive], atol=1e-5, rtol=1e-6)
        for row, picked in zip(got_tokens[alive].tolist(), got_scores[alive].tolist(), strict=True):
            assert len(set(row)) == k and eos not in row
            pairs = zip(picked[:-1], picked[1:], row[:-1], row[1:], strict=True)
            assert all(a > b or (a == b and s < t) for a, b, s, t in pairs)


@needs_kernel
def test_beam_candidates_refuse_what_they_cannot_take():
    logits, scores = torch.randn(3, 10), torch.zeros(3)
    with pytest.raises(ValueError, match="0 < k < V"):
        few_rows.beam_candidates(logits, scores, 2, 10)  # 9 tokens besides eos
    with pytest.raises(ValueError, match="0 < k < V"):
        few_rows.beam_candidates(logits, scores[:2], 2, 3)
    with pytest.raises(ValueError, match="eos 10"):
        few_rows.beam_candidates(logits, scores, 10, 3)
    with pytest.raises(ValueError, match="fp32"):
        few_rows.beam_candidates(logits.double(), scores, 2, 3)


def _fast_linear(out_features, in_features, bias=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).eval()
    linear.__class__ = ops.FastLinear  # as fast.prepare makes it
    return linear


@needs_kernel
def test_ops_linear_routes_few_rows_to_the_kernel_and_more_to_onednn():
    """From a weight's second use: up to FEW_ROWS_MAX rows through the kernel's panels, more through oneDNN's
    blocked copy, each kept by the module; fp32 results equal F.linear's either way."""
    linear = _fast_linear(64, 32)
    for rows, layout in ((ops.FEW_ROWS_MAX, ops.FEW_ROWS), (ops.FEW_ROWS_MAX + 1, torch.float32)):
        x = torch.randn(rows, 32)
        for _ in range(3):
            with torch.no_grad():
                torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias))
        assert linear._kept[layout] is not None
    assert set(linear._kept) == {ops.FEW_ROWS, torch.float32}


def test_turned_off_or_unbuildable_falls_back_to_onednn(monkeypatch, tmp_path):
    """MED_FEW_ROWS=0 turns the kernel off; a compiler that fails warns once with its message and leaves
    ops.linear on oneDNN, with F.linear's results."""
    monkeypatch.setattr(few_rows, "_loaded", few_rows._loaded)  # restored for the tests after this one
    monkeypatch.setattr(few_rows, "_tried", False)
    monkeypatch.setenv("MED_FEW_ROWS", "0")
    assert "MED_FEW_ROWS=0" in few_rows.missing()
    assert not few_rows.build() and not few_rows.available()

    monkeypatch.delenv("MED_FEW_ROWS")
    monkeypatch.setattr(few_rows, "supported_here", lambda: True)
    monkeypatch.setattr(few_rows, "_tried", False)
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    if few_rows.ninja_folder() is None:
        pytest.skip("no ninja: the build is not attempted")
    with pytest.warns(RuntimeWarning, match="few-row product kernel .* unavailable"):
        assert not few_rows.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not few_rows.build() and not few_rows.available()  # decided once per process
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left

    linear, x = _fast_linear(16, 8, bias=False), torch.randn(2, 8)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(linear(x), F.linear(x, linear.weight))
    assert set(linear._kept) == {torch.float32}


def test_without_avx512_or_ninja_nothing_is_built_and_nothing_warns(monkeypatch):
    """A CPU without AVX-512 (torch's capability AVX2) or a machine without ninja: `missing()` says which, and
    `build()` quietly leaves every caller on torch's path."""
    monkeypatch.setattr(few_rows, "_loaded", few_rows._loaded)
    monkeypatch.delenv("MED_FEW_ROWS", raising=False)
    with monkeypatch.context() as m:
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert "AVX-512" in few_rows.missing() and "AVX2" in few_rows.missing()
        m.setattr(few_rows, "_tried", False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not few_rows.build() and not few_rows.available()
    monkeypatch.setattr(few_rows, "supported_here", lambda: True)
    monkeypatch.setenv("CXX", sys.executable)  # a compiler that exists (never run here)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setitem(sys.modules, "ninja", None)  # the ninja package is not installed either
    assert few_rows.ninja_folder() is None and "ninja" in few_rows.missing()
    monkeypatch.setattr(few_rows, "_tried", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not few_rows.build()


def test_the_build_folder_changes_with_source_flags_compiler_and_torch(monkeypatch, tmp_path):
    """The library links against torch and is compiled with these flags by this compiler: a change of any of
    them (or of the source) must build anew in a folder of its own, never load the old library."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = few_rows.build_folder()
    assert first.parent == tmp_path / "med_train" and few_rows.build_folder() == first
    changes = [("FLAGS", [*few_rows.FLAGS, "-DMED_TEST_FLAG"]), ("compiler", lambda: "/opt/other/g++"),
               ("SOURCE", tmp_path / "other.cpp")]
    (tmp_path / "other.cpp").write_text(few_rows.SOURCE.read_text() + "\n// changed\n")
    for name, value in changes:
        with monkeypatch.context() as m:
            m.setattr(few_rows, name, value)
            assert few_rows.build_folder() != first, name
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.1")
        assert few_rows.build_folder() != first


@needs_kernel
def test_forward_paths_never_build_and_a_later_process_loads_without_compiling():
    """In a fresh process, products through a FastLinear and available() leave the kernel unbuilt and unloaded
    (torch's path); `build()` then loads the library this test run built, without compiling it again."""
    libraries = list(few_rows.build_folder().glob("*.so"))
    assert len(libraries) == 1
    stamp = libraries[0].stat().st_mtime_ns
    code = """if True:
        import torch
        import torch.nn.functional as F
        from med_train.fast import few_rows, ops
        linear, x = torch.nn.Linear(8, 16, bias=False).eval(), torch.randn(2, 8)
        linear.__class__ = ops.FastLinear
        weight = linear.weight.detach()
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(linear(x), F.linear(x, weight))
        assert not few_rows.available() and not few_rows._tried and not hasattr(torch.ops.med_few_rows, "matmul")
        assert few_rows.build() and few_rows.available()
        torch.testing.assert_close(few_rows.linear(x, few_rows.pack(weight.t()), 16), F.linear(x, weight))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert libraries[0].stat().st_mtime_ns == stamp


@needs_kernel
def test_the_profiler_names_each_operator():
    """Each call is one torch operator, med_few_rows::<name>, in the profiler's table."""
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 16, generator=g), torch.randn(20, 16, generator=g)
    product, norm = few_rows.Product(few_rows.pack(weight.t()), 20), few_rows.Norm(torch.ones(16), torch.zeros(16),
                                                                                  1e-5)
    q, kt, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 8, 5), torch.randn(1, 2, 5, 8)
    keys = torch.randn(4, 3, 2, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        product(x, gelu=True)
        product(x, out=torch.empty(3, 20))
        few_rows.matmul(x[None], few_rows.pack(weight.t()[None]), 20)
        norm(x, x)
        few_rows.attend(q, kt, v)
        few_rows.attend(q, kt, v, out=torch.empty(1, 2, 3, 8))
        few_rows.attend_history(torch.randn(3, 2, 8), keys, keys, torch.zeros(3, 2, dtype=torch.long))
        few_rows.beam_candidates(torch.randn(3, 30), torch.zeros(3), 2, 3)
    names = {event.key for event in profile.key_averages()}
    operators = {"matmul", "matmul_into", "attend", "attend_into", "attend_history", "add_norm", "beam_candidates"}
    assert {f"med_few_rows::{name}" for name in operators} <= names, sorted(names)


@needs_kernel
def test_the_operators_pass_opcheck_and_compile_without_a_graph_break():
    """Schemas, fake implementations (shapes without running the kernel) and mutation annotations, as
    torch.library.opcheck tests them; a product, GELU and a LayerNorm traced by torch.compile as one graph give
    the eager results."""
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(5, 16, generator=g), torch.randn(20, 16, generator=g), torch.randn(20, generator=g)
    panels = few_rows.pack(weight.t())
    q, kt, v = torch.randn(2, 2, 3, 8, generator=g), torch.randn(2, 2, 8, 5, generator=g), torch.randn(2, 2, 5, 8,
                                                                                                     generator=g)
    keys = torch.randn(4, 3, 2, 8, generator=g)
    ops_ = torch.ops.med_few_rows
    cases = [(ops_.matmul, (x, panels, 20, bias, True)), (ops_.matmul_into, (x, panels, 20, None, False,
                                                                              torch.empty(5, 20))),
             (ops_.attend, (q, kt, v, torch.randn(2, 1, 1, 5).expand(2, 2, 3, 5), 0.3)),
             (ops_.attend_into, (q, kt, v, None, 0.3, torch.empty(2, 2, 3, 8))),
             (ops_.attend_history, (torch.randn(3, 2, 8), keys, keys, torch.tensor([[0, 2], [1, 1], [2, 0]]), 0.3)),
             (ops_.add_norm, (x, x.flip(0).contiguous(), torch.randn(16), torch.randn(16), 1e-5)),
             (ops_.beam_candidates, (torch.randn(3, 30, generator=g), torch.zeros(3), 2, 3))]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))
    product, norm = few_rows.Product(panels, 20, bias), few_rows.Norm(torch.ones(20), torch.zeros(20), 1e-5)

    def step(rows):
        hidden = product(rows, gelu=True)
        return norm(hidden, hidden)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))


def test_captioning_on_the_cpu_builds_the_kernel_before_the_first_batch(monkeypatch, tmp_path):
    """`med caption` and `med eval` (caption_files, evaluate) prepare the model's fast paths, which builds the kernel
    on the CPU, before they decode, so that no forward call meets an unbuilt kernel; on another device the kernel is
    left alone."""
    from types import SimpleNamespace

    from PIL import Image

    from med_train import evaluate, fast
    from med_train.config import Config

    events = []
    monkeypatch.setattr(few_rows, "build", lambda: events.append("build") or few_rows.available())
    model = torch.nn.Linear(2, 2)
    model.cfg, model.generate = SimpleNamespace(vision=SimpleNamespace(image_size=16)), (
        lambda images, **_: events.append("generate") or ["a"] * len(images))
    model.device = torch.device("cpu")
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.png")
    assert [caption for _, caption, _ in evaluate.caption_files(model, [str(tmp_path / "a.png")])] == ["a"]
    assert events == ["build", "generate"]

    def stop(images, **_):  # the first batch is all this needs: no scoring
        events.append("generate")
        raise InterruptedError

    model.generate = stop
    model.__dict__.pop("fast_paths")  # prepared once per model: a new one for the second command
    batch = {"images": torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "ids": ["1"], "references": [["a red one"]]}
    with pytest.raises(InterruptedError):
        evaluate.evaluate(model, Config(), loader=[batch], quiet=True)
    assert events == ["build", "generate"] * 2
    fast.prepare(torch.nn.Linear(2, 2), "cuda")
    assert events == ["build", "generate"] * 2
