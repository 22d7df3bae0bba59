"""Products of a decoding step's few rows on the CPU, fp32 (AVX-512), from `few_rows.cpp`: x W^T + b (GELU
applied as it is stored, optionally), x[i] b[i], the few queries' attention over stored keys and values
(`attend`), a step's self-attention over each row's history where it was stored (`attend_history`: beams are
never copied), a residual add with LayerNorm in one pass (`Norm`), and a beam step's candidates (`beam_candidates`).

    if few_rows.available():
        panels = few_rows.pack(weight.t())              # once per weight (N, K): (ceil(N / 48), K, 48)
        y = few_rows.linear(x, panels, weight.shape[0], bias)   # F.linear(x, weight, bias)
        y = few_rows.Product(panels, weight.shape[0], bias)(x, gelu=True)  # F.gelu(F.linear(...)), bound weight
        y = few_rows.Norm(ln.weight, ln.bias, ln.eps)(x, residual)        # ln(x + residual)
        ending, top, tokens = few_rows.beam_candidates(logits, beam_scores, eos, k)  # log_softmax + top-k
        y = few_rows.matmul(x, few_rows.pack(b), b.shape[-1])   # torch.bmm(x, b), b (B, K, N)
        out = few_rows.attend(q, k.transpose(-1, -2), v, mask)  # SDPA(q, k, v, mask), keys stored transposed
        out = few_rows.attend_history(q, keys, values, source)   # SDPA over keys[p, source[r, p]], p < T

Why: a decoding step multiplies every decoder weight by a handful of rows (8 for greedy at batch 8, 24 for beam 3),
where the libraries torch calls run well below the machine's rate. On the bench machine (2-core AMD EPYC, one
thread, dense matmul 102 GFLOP/s), a BERT layer's eight weights against 8 rows: MKL's sgemm (F.linear) 34 GFLOP/s,
oneDNN with the weight prepacked 58, this kernel 92; against 24 rows 61, 91 and 102; with two threads at 8 rows
oneDNN 99, this kernel 150. It beats oneDNN at every row count measured up to 64 (`ops.FEW_ROWS_MAX`).
torch.compile's own CPU GEMM template was slower still (29 GFLOP/s at 8 rows). A beam step's cross-attention (3
queries per image and head against 197 image tokens) is too small for batched sgemm too: `attend` takes a layer's
in 0.69 ms where two batched products take 1.7 (the bench's beam-3 decode). How: see the .cpp's header.

The kernel is built on first use with the C++ compiler found (`$CXX`, else g++, c++ or clang++) into
`$XDG_CACHE_HOME/med_train` (default `~/.cache/med_train`), keyed by a hash of the source and flags, and loaded
with ctypes; OpenMP comes from torch's own runtime (already loaded, same soname). Only on Linux x86-64 with
AVX-512 (torch's CPU capability). Anywhere it cannot be built, `available()` is False and `ops.linear` keeps
oneDNN; a compiler that fails says why once (a warning). `MED_FEW_ROWS=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("few_rows.cpp")
FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC"]
PANEL = 48  # outputs per packed panel (kPanel in the source)
VERSION = 7  # med_few_rows_version() of the source this module speaks to

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def supported_here() -> bool:
    """Whether this machine can run the kernel at all: Linux on x86-64, a CPU with AVX-512 (as torch sees it: the
    ATEN_CPU_CAPABILITY variable can lower it), and not turned off with MED_FEW_ROWS=0."""
    return (os.environ.get("MED_FEW_ROWS", "1") != "0" and sys.platform.startswith("linux")
            and platform.machine() in ("x86_64", "AMD64")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else the first of g++, c++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    return next((path for name in ("g++", "c++", "clang++") if (path := shutil.which(name))), None)


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "med_train"


def build(cxx: str, folder: Path) -> Path:
    """Compile the source into `folder` (once per source, flags and compiler: the name carries their hash) and
    return the library's path. The file appears whole or not at all (written aside, then renamed), so processes
    that build at once, as accelerate's do, never load half a library. Raises RuntimeError with the compiler's
    message."""
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, cxx]).encode()).hexdigest()[:16]
    target = folder / f"few_rows-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=folder, prefix=target.stem, suffix=".part")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _load() -> ctypes.CDLL | None:
    if not supported_here() or (cxx := compiler()) is None:
        return None
    try:
        library = ctypes.CDLL(str(build(cxx, cache_folder())))
        if library.med_few_rows_version() != VERSION:
            raise RuntimeError(f"the built library speaks version {library.med_few_rows_version()}, not {VERSION}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"the few-row product kernel ({SOURCE.name}) is unavailable, decoding on the CPU uses "
                      f"oneDNN instead: {error}", RuntimeWarning, stacklevel=3)
        return None
    library.med_few_rows_matmul.restype = None
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    library.med_few_rows_matmul.argtypes = [pointer, i64, i64, i64, i64, pointer, i64, i64, pointer, i64, pointer,
                                            i64, ctypes.c_int, ctypes.c_int]
    library.med_few_rows_attend.restype = None
    strides = ctypes.POINTER(i64)
    library.med_few_rows_attend.argtypes = [pointer, strides, pointer, strides, pointer, strides, pointer, strides,
                                            pointer, strides, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    library.med_few_rows_add_norm.restype = None
    library.med_few_rows_add_norm.argtypes = [pointer, pointer, pointer, pointer, ctypes.c_float, pointer, i64, i64]
    library.med_few_rows_beam_candidates.restype = None
    library.med_few_rows_beam_candidates.argtypes = [pointer, i64, i64, i64, pointer, i64, i64, pointer, pointer,
                                                     pointer, ctypes.c_int]
    library.med_few_rows_attend_history.restype = None
    library.med_few_rows_attend_history.argtypes = [pointer, i64, i64, i64, pointer, pointer, i64, i64, pointer, i64,
                                                    i64, ctypes.c_float, pointer, ctypes.c_int]
    return library


def available() -> bool:
    """Whether the kernel is built and loaded (built on the first call; later calls only look)."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library, _tried = _load(), True
    return _library is not None


def pack(b: torch.Tensor) -> torch.Tensor:
    """A matrix b (..., K, N) of products x @ b (a weight W: pack(W.t())) as the kernel reads it, in fp32: panels
    of PANEL columns, each K x PANEL contiguous, zeros past N: (..., ceil(N / PANEL), K, PANEL). One pass over b."""
    *batch, k, n = b.shape
    full, left = divmod(n, PANEL)
    panels = b.new_empty(*batch, full + (left > 0), k, PANEL, dtype=torch.float32)
    b = b.detach()
    if full:
        panels[..., :full, :, :].copy_(b[..., : full * PANEL].unflatten(-1, (full, PANEL)).transpose(-2, -3))
    if left:
        panels[..., full, :, :left].copy_(b[..., full * PANEL:])
        panels[..., full, :, left:].zero_()
    return panels


def linear(x: torch.Tensor, panels: torch.Tensor, outputs: int, bias: torch.Tensor | None = None, *,
           gelu: bool = False) -> torch.Tensor:
    """x @ W^T + bias for `panels = pack(W.t())` with `outputs` = W's rows; x (..., K) fp32 on the CPU, any leading
    dimensions. Equal to F.linear to float rounding (the sums run over K in order). `gelu=True`: F.gelu of that
    (BERT's exact, erf GELU, computed as torch does), applied as each output is stored. Needs `available()`."""
    k = x.shape[-1]
    _check_panels(panels, (-(-outputs // PANEL), k, PANEL), outputs)  # panels for x's width
    _check(x, k)
    return Product(panels, outputs, bias)(x.reshape(-1, k).contiguous(), gelu=gelu).view(*x.shape[:-1], outputs)


def matmul(x: torch.Tensor, panels: torch.Tensor, outputs: int) -> torch.Tensor:
    """x[i] @ b[i] for `panels = pack(b)`, b (B, K, N) with N = `outputs`: x (B, M, K) fp32 on the CPU; returns
    (B, M, N). As torch.bmm(x, b) to float rounding. Needs `available()`."""
    if x.dim() != 3:
        raise ValueError(f"matmul takes x (B, M, K), got {tuple(x.shape)}")
    batch, _, k = x.shape
    _check_panels(panels, (batch, -(-outputs // PANEL), k, PANEL), outputs)
    _check(x, k)
    return _run(x, panels, panels.stride(0), outputs, None, 0)


def attend(query: torch.Tensor, keys_t: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
           scale: float | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(query @ keys_t * scale + mask) @ value for each (batch, head), in one pass that keeps the scores in
    cache: query (B, H, R, D), keys_t (B, H, D, S) (the keys transposed: each head's keys stored as D rows of S),
    value (B, H, S, D), mask an additive bias broadcastable to (B, H, R, S) or None, scale D ** -0.5 by default;
    fp32 on the CPU. Returns (B, H, R, D), as F.scaled_dot_product_attention(query, keys_t.transpose(-1, -2),
    value, mask) to float rounding (the softmax's exp is a polynomial good to about 1 ulp). `out`: where to write it,
    a (B, H, R, D) view whose last dimension is contiguous (e.g. rows (B, R, H, D) seen heads first). Needs
    `available()`."""
    _require_fp32_cpu("attend", query=query, keys_t=keys_t, value=value, mask=mask, out=out)
    if query.dim() != 4 or keys_t.dim() != 4 or value.dim() != 4:
        raise ValueError(f"attend takes 4-d query, keys_t and value, got {query.dim()}, {keys_t.dim()} and "
                         f"{value.dim()} dimensions")
    b, h, r, d = query.shape
    s = keys_t.shape[-1]
    if keys_t.shape != (b, h, d, s) or value.shape != (b, h, s, d):
        raise ValueError(f"attend: query {tuple(query.shape)} needs keys_t (B, H, D, S) = ({b}, {h}, {d}, S) and "
                         f"value (B, H, S, D), got {tuple(keys_t.shape)} and {tuple(value.shape)}")
    query, keys_t, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys_t, value))
    if mask is not None:
        mask = mask.expand(b, h, r, s)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    if out is None:
        out = query.new_empty(b, h, r, d)
    elif out.shape != (b, h, r, d) or out.stride(-1) != 1:
        raise ValueError(f"attend: out must be ({b}, {h}, {r}, {d}) with a contiguous last dimension, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    if out.numel() == 0:
        return out
    if s == 0:
        raise ValueError("attend needs at least one key")

    def strides(t):
        return (ctypes.c_int64 * 3)(*t.stride()[:3])

    _library.med_few_rows_attend(query.data_ptr(), strides(query), keys_t.data_ptr(), strides(keys_t),
                                 value.data_ptr(), strides(value), None if mask is None else mask.data_ptr(),
                                 None if mask is None else strides(mask), out.data_ptr(), strides(out), b, h, r, s, d,
                                 d**-0.5 if scale is None else scale, torch.get_num_threads())
    return out


def attend_history(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, source: torch.Tensor,
                   scale: float | None = None) -> torch.Tensor:
    """Self-attention of one new query per text row over a history that was never reordered: query (R, H, D);
    keys and values (P, S, H, D), position p's K/V of every stored row; source (R, T) int64, the stored row that
    holds text row r's position p (T <= P). Returns (R, H, D): softmax(q . K[p, source[r, p]] * scale) weighted
    V[p, source[r, p]] over p < T, scale D ** -0.5 by default; fp32 on the CPU. Needs `available()`."""
    _require_fp32_cpu("attend_history", query=query, keys=keys, values=values)
    if query.dim() != 3 or keys.dim() != 4 or keys.shape != values.shape or keys.shape[2:] != query.shape[1:]:
        raise ValueError(f"attend_history takes query (R, H, D) and keys/values (P, S, H, D), got "
                         f"{tuple(query.shape)}, {tuple(keys.shape)} and {tuple(values.shape)}")
    r, h, d = query.shape
    if source.dim() != 2 or source.shape[0] != r or source.dtype != torch.int64 or source.shape[1] > keys.shape[0]:
        raise ValueError(f"attend_history: source must be int64 ({r}, T <= {keys.shape[0]}), got {source.dtype} "
                         f"{tuple(source.shape)}")
    if keys.stride() != values.stride() or keys.stride()[2:] != (d, 1):
        raise ValueError("attend_history: keys and values need the same strides, each position's rows (H, D) "
                         "contiguous")
    if source.numel() and (int(source.min()) < 0 or int(source.max()) >= keys.shape[1]):
        raise ValueError(f"attend_history: source rows must lie in 0 .. {keys.shape[1] - 1}")
    if source.shape[1] == 0 and query.numel():
        raise ValueError("attend_history needs at least one position")
    return _attend_history(query.contiguous(), keys, values, source if source.stride(1) == 1 else source.contiguous(),
                           d**-0.5 if scale is None else scale)


def _attend_history(query, keys, values, source, scale: float) -> torch.Tensor:
    """attend_history's kernel call on checked arguments (query contiguous, source rows in range)."""
    r, h, d = query.shape
    out = query.new_empty(r, h, d)
    if out.numel():
        _library.med_few_rows_attend_history(query.data_ptr(), r, h, d, keys.data_ptr(), values.data_ptr(),
                                             keys.stride(0), keys.stride(1), source.data_ptr(), source.stride(0),
                                             source.shape[1], scale, out.data_ptr(), torch.get_num_threads())
    return out


def beam_candidates(logits: torch.Tensor, beam_scores: torch.Tensor, eos: int | None, k: int):
    """A beam search step's candidates, per row: with c = beam_scores[:, None] + logits.log_softmax(-1) (R, V),
    returns (c[:, eos] (R,), the k largest of c over the tokens other than eos (R, k) best first, and their tokens
    (R, k) int64), in one pass over the logits instead of log_softmax, a sum and a top-k over (R, V) tensors.
    Ties go to the lower token. logits (R, V) fp32 on the CPU, its last dimension contiguous; beam_scores (R,);
    eos None: no token is set apart (the first result is then -inf). Needs `available()`."""
    _require_fp32_cpu("beam_candidates", logits=logits, beam_scores=beam_scores)
    if logits.dim() != 2 or beam_scores.shape != logits.shape[:1] or not 0 < k <= logits.shape[1] - (eos is not None):
        raise ValueError(f"beam_candidates takes logits (R, V), beam_scores (R,) and 0 < k < V, got "
                         f"{tuple(logits.shape)}, {tuple(beam_scores.shape)} and k={k}")
    if eos is not None and not 0 <= eos < logits.shape[1]:
        raise ValueError(f"beam_candidates: eos {eos} is not a token of the {logits.shape[1]}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    beam_scores = beam_scores.contiguous()
    rows = logits.shape[0]
    ending, scores = logits.new_empty(rows), logits.new_empty(rows, k)
    tokens = torch.empty(rows, k, dtype=torch.int64)
    if rows:
        _library.med_few_rows_beam_candidates(logits.data_ptr(), rows, logits.shape[1], logits.stride(0),
                                              beam_scores.data_ptr(), -1 if eos is None else eos, k,
                                              ending.data_ptr(), scores.data_ptr(), tokens.data_ptr(),
                                              torch.get_num_threads())
    return ending, scores, tokens


class Product:
    """`linear` with one weight's panels and bias bound, for a decoding step's many calls: x (R, K) fp32, contiguous,
    on the CPU -> (R, N), or into `out` (R, N) contiguous (e.g. a cache's slot). Checks x on each call, the
    weight once."""

    def __init__(self, panels: torch.Tensor, outputs: int, bias: torch.Tensor | None = None):
        self.inputs = panels.shape[-2]
        _check_panels(panels, (-(-outputs // PANEL), self.inputs, PANEL), outputs)
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (outputs,) or bias.device.type != "cpu"):
            raise ValueError(f"the bias must be fp32 ({outputs},) on the CPU, got {bias.dtype} {tuple(bias.shape)}")
        self.panels, self.outputs = panels, outputs
        self.bias = None if bias is None else bias.detach().contiguous()
        self._bias = None if bias is None else self.bias.data_ptr()

    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.inputs
                or not x.is_contiguous()):
            raise ValueError(f"Product takes contiguous fp32 CPU rows (R, {self.inputs}), got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        rows = x.shape[0]
        if out is None:
            out = x.new_empty(rows, self.outputs)
        elif (out.dtype != torch.float32 or out.device.type != "cpu" or out.shape != (rows, self.outputs)
              or not out.is_contiguous()):
            raise ValueError(f"Product's out must be contiguous fp32 ({rows}, {self.outputs}) on the CPU, got "
                             f"{out.dtype} {tuple(out.shape)}")
        if rows:
            _library.med_few_rows_matmul(x.data_ptr(), 1, 0, rows, self.inputs, self.panels.data_ptr(), 0,
                                         self.outputs, self._bias, 0, out.data_ptr(), 0, int(gelu),
                                         torch.get_num_threads())
        return out


class Norm:
    """A LayerNorm's weight, bias and eps bound: `norm(x, residual)` = F.layer_norm(x + residual) over the last
    dimension, in one pass of the kernel, for contiguous fp32 CPU rows (R, W) (residual None: of x alone). Equal
    to torch's to float rounding. Needs `available()`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        _require_fp32_cpu("Norm", weight=weight, bias=bias)
        if weight.dim() != 1 or bias.shape != weight.shape:
            raise ValueError(f"Norm takes weight and bias (W,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
        self.weight, self.bias, self.eps = weight.detach().contiguous(), bias.detach().contiguous(), float(eps)
        self._weight, self._bias = self.weight.data_ptr(), self.bias.data_ptr()
        self.width = weight.shape[0]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        for t in (x, residual):
            if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2
                                  or t.shape[1] != self.width or not t.is_contiguous()):
                raise ValueError(f"Norm takes contiguous fp32 CPU rows (R, {self.width}), got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"Norm: residual {tuple(residual.shape)} is not shaped as x {tuple(x.shape)}")
        out = torch.empty_like(x)
        if out.numel():
            _library.med_few_rows_add_norm(x.data_ptr(), None if residual is None else residual.data_ptr(),
                                           self._weight, self._bias, self.eps, out.data_ptr(), x.shape[0],
                                           self.width)
        return out


def _require_fp32_cpu(function: str, **tensors: torch.Tensor | None) -> None:
    """The kernel is loaded and the given tensors (None: absent) are fp32 on the CPU, else a clear error."""
    if not available():
        raise RuntimeError("the few-row kernel is not available here (see few_rows.available)")
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"{function} takes fp32 CPU tensors, got {name} {t.dtype} on {t.device}")


def _run(x, panels, panels_stride, outputs, bias, bias_stride) -> torch.Tensor:
    """The kernel over x (batch, rows, K) made contiguous, into a new (batch, rows, outputs)."""
    x = x.contiguous()
    batch, rows, k = x.shape
    y = x.new_empty(batch, rows, outputs)
    if bias is not None:
        bias = bias.contiguous()
    if batch and rows and outputs:
        _library.med_few_rows_matmul(x.data_ptr(), batch, rows * k, rows, k, panels.data_ptr(), panels_stride,
                                     outputs, None if bias is None else bias.data_ptr(), bias_stride, y.data_ptr(),
                                     rows * outputs, 0, torch.get_num_threads())
    return y


def _check_panels(panels: torch.Tensor, shape: tuple, outputs: int) -> None:
    if panels.shape != shape or panels.dtype != torch.float32 or not panels.is_contiguous():
        raise ValueError(f"panels {panels.dtype} {tuple(panels.shape)} are not pack()'s for {outputs} outputs "
                         f"(expected fp32 {shape}, contiguous)")


def _check(x: torch.Tensor, width: int) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != width:
        raise ValueError(f"the few-row kernel takes fp32 CPU rows of width {width}, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
