"""Compute kernels: pure functions on arrays, one family per module.

``kernels.cpu`` holds ``@njit`` kernels (built through :mod:`kdnumba._policy`),
``kernels.cuda`` the ``numba.cuda`` variants (imported only on demand).
Kernels never validate, never allocate user-visible objects beyond their
outputs, and know nothing of strategies or devices.
"""
