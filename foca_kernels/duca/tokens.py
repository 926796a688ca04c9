"""Token-wise cache state and the refresh of a conservative step.

A :class:`TokenCache` holds, for one cached module output of shape ``(B, N, C)`` (batch,
tokens, channels): the cached value of every token (storage dtype) and, per token, how many
conservative steps ago it was last computed (int32; the staleness counter of DuCa/ToCa).
:func:`refresh_tokens_` is a conservative step: the module ran on the selected tokens only,
and their rows replace the cached rows, in the caller's output and in the state, in one pass.
Every check runs before anything is written, so a refused call leaves the state as it was.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backend import get_backend
from ..ops.aliasing import overlaps
from ..state import STORAGE_DTYPES


class TokenCache:
    """Cached rows ``value`` ``(B, N, C)`` and staleness counters ``age`` ``(B, N)``."""

    def __init__(self, value: torch.Tensor, io_dtype: Optional[torch.dtype] = None, age: Optional[torch.Tensor] = None):
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            raise ValueError(f"a token cache holds a (batch, tokens, channels) tensor, got {_shape(value)}")
        if value.dtype not in STORAGE_DTYPES:
            raise TypeError(f"token cache dtype must be one of {STORAGE_DTYPES}, got {value.dtype}")
        if not value.is_contiguous():
            raise ValueError("the token cache's value must be contiguous (rows are addressed as row * channels)")
        io_dtype = value.dtype if io_dtype is None else io_dtype
        if io_dtype not in STORAGE_DTYPES:
            raise TypeError(f"feature dtype must be one of {STORAGE_DTYPES}, got {io_dtype}")
        if age is None:
            age = torch.zeros(value.shape[:2], dtype=torch.int32, device=value.device)
        elif (age.shape != value.shape[:2] or age.dtype != torch.int32 or age.device != value.device
              or not age.is_contiguous()):
            raise ValueError(f"age must be a contiguous int32 tensor of shape {tuple(value.shape[:2])} "
                             f"on {value.device}")
        self.value = value
        self.age = age
        self.io_dtype = io_dtype

    @classmethod
    def allocate(cls, example: torch.Tensor, dtype: Optional[torch.dtype] = None) -> "TokenCache":
        """A cache for tensors shaped like ``example`` (filled by :meth:`fill_`)."""
        value = torch.zeros(example.shape, dtype=dtype or example.dtype, device=example.device)
        return cls(value, example.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    @property
    def nbytes(self) -> int:
        return self.value.numel() * self.value.element_size() + self.age.numel() * 4

    def fill_(self, x: torch.Tensor) -> "TokenCache":
        """A fully computed step: every token cached, every counter 0."""
        _check_like(self, x, "feature")
        self.value.copy_(x)
        self.age.zero_()
        return self


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_like(cache: TokenCache, x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.shape != cache.shape:
        raise ValueError(f"{what} has shape {tuple(x.shape)} but the token cache holds {tuple(cache.shape)}")
    if x.dtype != cache.io_dtype:
        raise TypeError(f"{what} has dtype {x.dtype} but the token cache expects {cache.io_dtype}")
    if x.device != cache.value.device:
        raise ValueError(f"{what} is on {x.device} but the token cache lives on {cache.value.device}")


def check_refresh(cache: TokenCache, out, fresh, index, check_indices: bool = True) -> None:
    """Every input check of :func:`refresh_tokens_` (raises; changes nothing)."""
    if not isinstance(cache, TokenCache):
        raise TypeError(f"cache must be a TokenCache, got {type(cache).__name__}")
    _check_like(cache, out, "out")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    b, n, c = cache.shape
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.shape[0] != b:
        raise ValueError(f"index must be a (batch={b}, k) tensor of token indices, got {_shape(index)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must hold int32 or int64 token indices, got {index.dtype}")
    k = index.shape[1]
    if k > n:
        raise ValueError(f"index selects {k} tokens per sample but there are only {n}")
    if not isinstance(fresh, torch.Tensor) or tuple(fresh.shape) != (b, k, c):
        raise ValueError(f"fresh must hold the selected rows, shape {(b, k, c)}, got {_shape(fresh)}")
    if fresh.dtype != cache.io_dtype:
        raise TypeError(f"fresh has dtype {fresh.dtype} but the token cache expects {cache.io_dtype}")
    for name, x in (("fresh", fresh), ("index", index)):
        if x.device != cache.value.device:
            raise ValueError(f"{name} is on {x.device} but the token cache lives on {cache.value.device}")
    for name, x in (("out", out), ("fresh", fresh)):
        if overlaps(x, cache.value):
            raise ValueError(f"{name} aliases the token cache's own storage; pass a separate tensor")
    if overlaps(out, fresh):
        raise ValueError("out aliases fresh; pass a separate tensor")
    if check_indices and k:  # costs a host sync on GPU: the hooks make their indices themselves
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= n:
            raise IndexError(f"token indices out of range: they must be in [0, {n}), got values in [{lo}, {hi}]")
        srt = index.sort(dim=1).values
        if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("index selects a token twice in one sample; indices must be distinct per sample")


def flat_rows(index: torch.Tensor, n: int) -> torch.Tensor:
    """Row numbers in the flattened ``(B * N)`` rows of the selected tokens, sample-major."""
    base = torch.arange(index.shape[0], device=index.device, dtype=torch.int64).unsqueeze(1) * n
    return (index.to(torch.int64) + base).reshape(-1)


def refresh_tokens_(cache: TokenCache, out: torch.Tensor, fresh: torch.Tensor, index: torch.Tensor, *,
                    backend: Optional[str] = None, check_indices: bool = True) -> torch.Tensor:
    """A conservative step. ``fresh[b, j]`` is the module output for token ``index[b, j]``
    computed this step. Afterwards ``out`` holds the cached value of every token with the
    fresh rows in place, the cache holds the fresh rows too, and the staleness counters are 0
    for the fresh tokens and one more for every other token. Returns ``out``."""
    check_refresh(cache, out, fresh, index, check_indices)
    b, n, c = cache.shape
    name = get_backend(cache.value.device, backend)
    rows = flat_rows(index, n)
    state2, out2, fresh2 = cache.value.view(b * n, c), out.view(b * n, c), fresh.reshape(-1, c)
    age = cache.age.view(-1)
    if name == "triton":
        from ..ops.triton_tokens import tokens_triton  # late: TRITON_INTERPRET must be settled first

        src = torch.full((b * n,), -1, dtype=torch.int32, device=out.device)
        src[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=out.device)
        tokens_triton(state2, fresh2.contiguous(), out2, src, age)
    else:
        from ..ops.torch_tokens import tokens_torch

        tokens_torch(state2, fresh2, out2, rows, age)
    return out
