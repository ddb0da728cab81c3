"""The detserve engine: requests in, batch-invariant forward passes over a paged KV cache, tokens out.

Importing it first makes the top-level name `kernels` skip a detserve checkout. The checkout's
`kernels/` folder is `detserve.kernels`, but wherever the checkout's root is on `sys.path` (pytest's
rootdir, `python -m` run from it) it would also answer `import kernels`. transformers imports
Hugging Face's `kernels` package whenever a version it supports is installed (5.25 with kernels
0.19.1 did, at its first import), and then failed on our folder. So `import kernels` now finds
the installed package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

_CHECKOUT = Path(__file__).resolve().parents[1]  # in a wheel: .../site-packages/detserve, never on sys.path


class _HubKernelsBeforeTheCheckout(importlib.abc.MetaPathFinder):
    """Finds the top-level `kernels` on every `sys.path` entry except the checkout's root."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "kernels":
            return None
        elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
        # None when it is not installed: then no distribution named `kernels` exists either, so
        # transformers (which asks for its version too) never imports the name.
        return importlib.machinery.PathFinder.find_spec(name, elsewhere)


if not any(isinstance(finder, _HubKernelsBeforeTheCheckout) for finder in sys.meta_path):
    sys.meta_path.insert(0, _HubKernelsBeforeTheCheckout())
