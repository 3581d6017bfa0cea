"""Numba flags live here, in one place, so every kernel is compiled the same way.

`cache=True` keeps the compiled kernels on disk (first call ~1 s, later processes load them);
`nogil=True` lets threads run kernels side by side; fastmath stays off so the kernels give the
same bits as the plain NumPy reference in the tests.
"""

import numba

JIT_OPTIONS = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


def njit(fn):
    return numba.njit(**JIT_OPTIONS)(fn)
