"""Products of a decoding step's few rows on the CPU, fp32 (AVX-512), from `few_rows.cpp`: x W^T + b (GELU
applied as it is stored, optionally), x[i] b[i], the few queries' attention over stored keys and values
(`attend`), a step's self-attention over each row's history where it was stored (`attend_history`: beams are
never copied), a residual add with LayerNorm in one pass (`Norm`), and a beam step's candidates (`beam_candidates`).

    few_rows.build()                                    # once, before decoding: compiles the first time
    if few_rows.available():                            # all a forward path asks
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

The kernel is built by `build()`, an explicit step taken before decoding on the CPU (`med eval`, `med caption`,
`med bench` and validation in training take it; a library user calls it once), never inside a forward call:
`torch.utils.cpp_extension` compiles the source with ninja and the C++ compiler found (`$CXX`, else c++, g++ or
clang++) into `$XDG_CACHE_HOME/med_train` (default `~/.cache/med_train`), in a folder keyed by a hash of the
source, flags, compiler and torch (half a minute the first time on 2 cores, 0.2 s after: ninja finds it built;
processes that build at once, as accelerate's do, wait on one lock). Its functions are torch operators
(`torch.ops.med_few_rows.*`, with fake implementations for FakeTensor and torch.compile, named in the profiler);
through the dispatcher a call costs what the ctypes call it replaced did (a 1-row product 10 to 12 us with this
module's checks either way; a beam-3 step of the bench's decoder the same to within the noise, the same logits);
OpenMP comes from torch's own runtime (already loaded, same soname). Only on Linux x86-64 with AVX-512 (torch's
CPU capability), with a compiler and ninja (`pip install ninja`); anywhere else, or before `build()`,
`available()` is False and every caller keeps torch's own path, with the same results; a build that fails says
why once (a warning). `MED_FEW_ROWS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("few_rows.cpp")
FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp"]
PANEL = 48  # outputs per packed panel (kPanel in the source)

_lock = threading.Lock()
_loaded = False
_tried = False
_faked = False
# torch.ops.med_few_rows's operators once loaded, looked up once: a lookup through torch.ops takes about 2 us,
# as long as the dispatcher's whole call of a small product
_ops = types.SimpleNamespace()


def supported_here() -> bool:
    """Whether this machine can run the kernel at all: Linux on x86-64, a CPU with AVX-512 (as torch sees it: the
    ATEN_CPU_CAPABILITY variable can lower it), and not turned off with MED_FEW_ROWS=0."""
    return (os.environ.get("MED_FEW_ROWS", "1") != "0" and sys.platform.startswith("linux")
            and platform.machine() in ("x86_64", "AMD64")
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else the first of c++ (torch's default), g++, clang++ on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


def ninja_folder() -> str | None:
    """The folder of the ninja that torch's extension builder runs: the PATH's, else the `ninja` package's (its
    executable lands in the environment's bin folder, which a Python run by its full path may not have on the
    PATH); None: no ninja."""
    if path := shutil.which("ninja"):
        return str(Path(path).parent)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR if Path(ninja.BIN_DIR, "ninja").exists() else None


def missing() -> str | None:
    """Why the kernel cannot be built here, or None where it can."""
    if os.environ.get("MED_FEW_ROWS", "1") == "0":
        return "turned off (MED_FEW_ROWS=0)"
    if not supported_here():
        return (f"needs Linux on x86-64 with AVX-512; this is {sys.platform} on {platform.machine()}, torch's CPU "
                f"capability {torch.backends.cpu.get_cpu_capability()}")
    if compiler() is None:
        return "no C++ compiler ($CXX, c++, g++ or clang++)"
    if ninja_folder() is None:
        return "no ninja (pip install ninja)"
    return None


def cache_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "med_train"


def build_folder() -> Path:
    """Where the kernel is built: one folder per source, flags, compiler and torch/Python (the library links
    against both), so that a change of any of them builds anew instead of loading a library built for another."""
    key = [SOURCE.read_text(), *FLAGS, compiler() or "", torch.__version__, sys.version.split()[0]]
    return cache_folder() / f"few_rows-{hashlib.sha256(chr(0).join(key).encode()).hexdigest()[:16]}"


def build() -> bool:
    """Build (where `missing()` is None) and load the kernel, once per process: later calls only look. Returns
    `available()`. A build that fails warns once with the compiler's message and leaves the kernel unavailable."""
    global _loaded, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _loaded, _tried = _load(), True
    return _loaded


def available() -> bool:
    """Whether the kernel is loaded (by `build()`): the question every caller asks; it never builds."""
    return _loaded


@contextlib.contextmanager
def _environment(**values: str):
    """os.environ with `values` set, restored after (torch's builder reads the compiler and ninja from it)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _load() -> bool:
    if missing() is not None:
        return False
    quiet = logging.getLogger("torch.utils.cpp_extension")  # its import notes the absence of CUDA, a CPU build's norm
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    folder = build_folder()
    path = os.pathsep.join([ninja_folder(), os.environ.get("PATH", "")])
    if not (folder / "med_few_rows.so").exists():  # a pause of a minute or so deserves a word
        print(f"compiling the CPU decoding kernel ({SOURCE.name}) into {folder}, once", file=sys.stderr)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _environment(CXX=compiler(), PATH=path):
            cpp_extension.load("med_few_rows", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(folder), is_python_module=False)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"the few-row product kernel ({SOURCE.name}) is unavailable, decoding on the CPU uses "
                      f"torch instead: {str(error).strip()[-2000:]}", RuntimeWarning, stacklevel=3)
        return False
    _register_fakes()
    for name in ("matmul", "matmul_into", "attend", "attend_into", "attend_history", "add_norm", "beam_candidates"):
        setattr(_ops, name, getattr(torch.ops.med_few_rows, name))
    return True


def _register_fakes() -> None:
    """The operators' output shapes without running them (FakeTensor, torch.compile), once per process."""
    global _faked
    if _faked:
        return
    fake = torch.library.register_fake
    fake("med_few_rows::matmul")(lambda x, panels, outputs, bias, gelu: x.new_empty(*x.shape[:-1], outputs))
    fake("med_few_rows::matmul_into")(lambda x, panels, outputs, bias, gelu, out: None)
    fake("med_few_rows::attend")(lambda query, keys_t, value, mask, scale: torch.empty_like(query))
    fake("med_few_rows::attend_into")(lambda query, keys_t, value, mask, scale, out: None)
    fake("med_few_rows::attend_history")(lambda query, keys, values, source, scale: torch.empty_like(query))
    fake("med_few_rows::add_norm")(lambda x, residual, weight, bias, eps: torch.empty_like(x))
    fake("med_few_rows::beam_candidates")(lambda logits, beam_scores, eos, k: (
        logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0], k),
        logits.new_empty(logits.shape[0], k, dtype=torch.int64)))
    _faked = True


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


def _linear(x: torch.Tensor, panels: torch.Tensor, outputs: int, bias: torch.Tensor | None, gelu: bool
            ) -> torch.Tensor:
    """`linear`'s operator alone, for a decoding step's calls with panels known to be `pack`'s of the weight (a
    `FastLinear`'s own): the operator checks shapes, dtypes and devices itself (a RuntimeError, as F.linear's)."""
    width = x.shape[-1]
    return _ops.matmul(x.reshape(-1, width).contiguous(), panels, outputs, None if bias is None else bias.detach(),
                       gelu).view(*x.shape[:-1], outputs)


def matmul(x: torch.Tensor, panels: torch.Tensor, outputs: int) -> torch.Tensor:
    """x[i] @ b[i] for `panels = pack(b)`, b (B, K, N) with N = `outputs`: x (B, M, K) fp32 on the CPU; returns
    (B, M, N). As torch.bmm(x, b) to float rounding. Needs `available()`."""
    if x.dim() != 3:
        raise ValueError(f"matmul takes x (B, M, K), got {tuple(x.shape)}")
    batch, _, k = x.shape
    _check_panels(panels, (batch, -(-outputs // PANEL), k, PANEL), outputs)
    _check(x, k)
    return _ops.matmul(x.contiguous(), panels, outputs, None, False)


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
    if out is not None and (out.shape != (b, h, r, d) or out.stride(-1) != 1):
        raise ValueError(f"attend: out must be ({b}, {h}, {r}, {d}) with a contiguous last dimension, got "
                         f"{tuple(out.shape)} with strides {out.stride()}")
    if query.numel() == 0:
        return query.new_empty(b, h, r, d) if out is None else out
    if s == 0:
        raise ValueError("attend needs at least one key")
    scale = d**-0.5 if scale is None else scale
    if out is None:
        return _ops.attend(query, keys_t, value, mask, scale)
    _ops.attend_into(query, keys_t, value, mask, scale, out)
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
    """attend_history's operator alone, for a decoding step's calls on arguments known to fit (query contiguous,
    source's rows contiguous): it checks only what keeps it in bounds, without the messages naming the argument."""
    return _ops.attend_history(query, keys, values, source, scale)


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
    return _ops.beam_candidates(logits, beam_scores, -1 if eos is None else eos, k)


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

    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.inputs
                or not x.is_contiguous()):
            raise ValueError(f"Product takes contiguous fp32 CPU rows (R, {self.inputs}), got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")
        rows = x.shape[0]
        if out is None:
            return _ops.matmul(x, self.panels, self.outputs, self.bias, gelu)
        if (out.dtype != torch.float32 or out.device.type != "cpu" or out.shape != (rows, self.outputs)
                or not out.is_contiguous()):
            raise ValueError(f"Product's out must be contiguous fp32 ({rows}, {self.outputs}) on the CPU, got "
                             f"{out.dtype} {tuple(out.shape)}")
        _ops.matmul_into(x, self.panels, self.outputs, self.bias, gelu, out)
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
        self.width = weight.shape[0]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        for t in (x, residual):
            if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2
                                  or t.shape[1] != self.width or not t.is_contiguous()):
                raise ValueError(f"Norm takes contiguous fp32 CPU rows (R, {self.width}), got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"Norm: residual {tuple(residual.shape)} is not shaped as x {tuple(x.shape)}")
        return _ops.add_norm(x, residual, self.weight, self.bias, self.eps)


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
             eps: float) -> torch.Tensor:
    """`Norm`'s operator for a decoding step's calls on arguments known to fit (contiguous fp32 CPU rows (R, W),
    the residual shaped as x or None, weight and bias (W,)): checked by the operator only."""
    return _ops.add_norm(x, residual, weight.detach(), bias.detach(), float(eps))


def _require_fp32_cpu(function: str, **tensors: torch.Tensor | None) -> None:
    """The kernel is loaded and the given tensors (None: absent) are fp32 on the CPU, else a clear error."""
    if not available():
        raise RuntimeError("the few-row kernel is not available here (see few_rows.available)")
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"{function} takes fp32 CPU tensors, got {name} {t.dtype} on {t.device}")


def _check_panels(panels: torch.Tensor, shape: tuple, outputs: int) -> None:
    if panels.shape != shape or panels.dtype != torch.float32 or not panels.is_contiguous():
        raise ValueError(f"panels {panels.dtype} {tuple(panels.shape)} are not pack()'s for {outputs} outputs "
                         f"(expected fp32 {shape}, contiguous)")


def _check(x: torch.Tensor, width: int) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != width:
        raise ValueError(f"the few-row kernel takes fp32 CPU rows of width {width}, got {x.dtype} {tuple(x.shape)} "
                         f"on {x.device}")
