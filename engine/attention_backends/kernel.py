"""The CPU paged-attention kernel (paged_attention.c): built on first use with the system C compiler, loaded with
ctypes.

The shared library is cached under ``$PYPTO_CACHE_DIR/kernels`` (default ~/.cache/pypto-serving), named by a hash
of the source, the compiler and its flags and this CPU's feature flags (it is built with ``-march=native``), so a
cache shared between machines never loads a build for another CPU. Concurrent builders each write a temporary
file and rename it into place. Without a compiler (or when the build fails) `load` returns None and says why; the
caller then uses the plain-torch backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_ARGTYPES = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]


def cache_dir() -> Path:
    """Where built kernels are kept."""
    root = os.environ.get("PYPTO_CACHE_DIR") or Path.home() / ".cache" / "pypto-serving"
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("flags", "Features", "model name", "CPU part")]
    return platform.machine() + "\n".join(dict.fromkeys(keep))


class PagedAttentionKernel:
    """ctypes bindings of the kernel's float32 and bfloat16 entry points."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.functions = {torch.float32: lib.paged_attention_f32, torch.bfloat16: lib.paged_attention_bf16}
        for fn in self.functions.values():
            fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.functions

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 row_seq: torch.Tensor, row_len: torch.Tensor, out: torch.Tensor, scale: float) -> None:
        """out[t] = attention of q[t] ([rows, heads, dim]) over the first row_len[t] tokens of sequence
        row_seq[t], whose blocks are tables[row_seq[t]]. The caller guarantees contiguous cpu tensors of one
        dtype and in-range block ids and lengths (the kernel reads raw memory)."""
        rows, heads, dim = q.shape
        _, block_size, kv_heads, _ = k_cache.shape
        failed = self.functions[q.dtype](
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), row_seq.data_ptr(),
            row_len.data_ptr(), out.data_ptr(), rows, heads, kv_heads, dim, block_size, tables.shape[1], scale,
            torch.get_num_threads())
        if failed:
            raise MemoryError("paged attention kernel: scratch allocation failed")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _build(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> PagedAttentionKernel | None:
    """The kernel for this CPU, built once per machine; None (logged) when it cannot be built or loaded."""
    cc = _compiler()
    if cc is None:
        log.warning("paged attention kernel: no C compiler (cc, gcc or clang) found; using the torch backend")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *FLAGS, _cpu_signature()]).encode())
        target = cache_dir() / f"paged_attention-{key.hexdigest()[:16]}.so"
        if not target.exists():
            _build(cc, target)
        return PagedAttentionKernel(ctypes.CDLL(str(target)), target)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        log.warning("paged attention kernel: build or load failed (%s); using the torch backend", detail)
        return None
