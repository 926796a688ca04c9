"""Replacing a method on one object and putting back exactly what was there.

``forward`` of an ``nn.Module`` normally lives on its class; a wrapper is set as an instance
attribute, and removing it deletes that attribute again (or puts back the instance
attribute another tool had set, the very same object). Nothing on the class is touched.
"""

from __future__ import annotations

import functools
from typing import Callable

WRAPPER_FLAG = "__foca_cache_wrapper__"
_MISSING = object()


def _skip_for_dynamo(fn) -> None:
    """torch.compile never traces this function's frame (it graph-breaks at the call and
    runs it eagerly) but still compiles the frames it calls: the original forward."""
    try:
        from torch._dynamo.decorators import skip
    except ImportError:  # pragma: no cover - torch without dynamo
        return
    skip(fn)


def is_foca_wrapper(fn) -> bool:
    return getattr(fn, WRAPPER_FLAG, False) is True


class AttributePatch:
    """``obj.<attr>`` replaced by ``make(original_callable)``, undone by :meth:`restore`."""

    def __init__(self, obj, attr: str, make: Callable[[Callable], Callable], *, skip_dynamo: bool = False):
        self.obj = obj
        self.attr = attr
        self.own = obj.__dict__.get(attr, _MISSING)  # instance attribute before us, if any
        self.original = getattr(obj, attr)  # what the wrapper calls (bound method or callable)
        wrapper = make(self.original)
        if skip_dynamo:  # marks the code object: only for wrappers whose code is ours alone
            _skip_for_dynamo(wrapper)
        functools.update_wrapper(wrapper, self.original, updated=())
        setattr(wrapper, WRAPPER_FLAG, True)
        self.wrapper = wrapper
        setattr(obj, attr, wrapper)

    @property
    def on_top(self) -> bool:
        """Whether our wrapper is still what ``obj.<attr>`` holds."""
        return self.obj.__dict__.get(self.attr, _MISSING) is self.wrapper

    def restore(self) -> bool:
        """Put back what was there; False (and nothing changed) if something else wrapped
        the attribute after us: removing ours would remove theirs too."""
        if not self.on_top:
            return False
        if self.own is _MISSING:
            delattr(self.obj, self.attr)
        else:
            setattr(self.obj, self.attr, self.own)
        return True
