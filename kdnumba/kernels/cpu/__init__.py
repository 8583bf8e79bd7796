"""CPU kernels (Numba ``@njit``). Import a family module directly."""
