"""A small NumPy multilayer perceptron implementing the training protocol.

It is the reference student and teacher of ``kdnumba demo`` and a template for
a user's own model: dense layers, ReLU, named layers whose outputs can be
collected, a manual backward pass that accepts gradients injected at
intermediate layers, and Adam.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from kdnumba import _validation as v
from kdnumba.strategies.base import IntermediateActivations
from kdnumba.training._atomic import atomic_write

_ACTIVATIONS = ("relu", "linear")


class MLP:
    r"""Dense network ``x -> a_1 -> ... -> a_L`` with named layers.

    Layer ``l`` computes ``z_l = a_{l-1} W_l + b_l`` and ``a_l = relu(z_l)``
    (hidden layers) or ``a_l = z_l`` (``"linear"``, the default for the last
    layer, whose output is the logits). ``forward(x, collect=names)`` returns
    ``a_L`` and the ``a_l`` of the named layers; ``backward(g_L, {name: g_l})``
    runs the chain rule from the top, adding each injected ``g_l`` to
    ``dL/da_l`` when it reaches layer ``l``::

        dL/da_l = (dL/da_{l+1} * relu'(z_{l+1})) W_{l+1}^T + g_l
        dL/dW_l = a_{l-1}^T (dL/da_l * relu'(z_l)),  dL/db_l = sum_rows(...)

    (``relu'(0) = 0``). :meth:`step` applies Adam (Kingma & Ba 2015) with
    bias correction and optional decoupled weight decay (AdamW)::

        m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2
        p <- p - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps) - lr * wd * p

    Args:
        layer_sizes: ``[n_inputs, hidden..., n_outputs]`` (at least two).
        layer_names: one name per layer (``len(layer_sizes) - 1``); default
            ``"dense1", ..., "logits"``.
        activations: per layer ``"relu"`` or ``"linear"``; default ReLU on
            hidden layers and linear on the last.
        learning_rate, beta1, beta2, eps, weight_decay: Adam's settings.
        seed: seeds the He-normal initialisation (``W ~ N(0, 2/fan_in)`` for
            ReLU layers, ``N(0, 1/fan_in)`` for linear ones; ``b = 0``).
        dtype: ``np.float32`` (default) or ``np.float64``.
    """

    def __init__(self, layer_sizes: Sequence[int], *, layer_names: Sequence[str] | None = None,
                 activations: Sequence[str] | None = None, learning_rate: float = 1e-3,
                 beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0, dtype=np.float32):
        sizes = [v.check_int(n, f"layer_sizes[{i}]", minimum=1) for i, n in enumerate(layer_sizes)]
        if len(sizes) < 2:
            raise ValueError(f"layer_sizes needs at least an input and an output size, got {sizes}")
        n = len(sizes) - 1
        names = (tuple(f"dense{i + 1}" for i in range(n - 1)) + ("logits",)
                 if layer_names is None else tuple(layer_names))
        if len(names) != n:
            raise ValueError(f"layer_names needs {n} names (one per layer), got {len(names)}")
        for name in names:
            v.check_name(name, "layer name")
        if len(set(names)) != n:
            raise ValueError(f"layer_names must be unique, got {names}")
        acts = (("relu",) * (n - 1) + ("linear",)) if activations is None else tuple(activations)
        if len(acts) != n or any(a not in _ACTIVATIONS for a in acts):
            raise ValueError(f"activations must be {n} values from {_ACTIVATIONS}, got {acts}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in v.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype.name}")
        self.layer_sizes = tuple(sizes)
        self.layer_names = names
        self.activations = acts
        self.learning_rate = v.check_positive(learning_rate, "learning_rate")
        self.beta1 = v.check_unit_interval(beta1, "beta1")
        self.beta2 = v.check_unit_interval(beta2, "beta2")
        self.eps = v.check_positive(eps, "eps")
        self.weight_decay = v.check_non_negative(weight_decay, "weight_decay")
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        for i in range(n):
            gain = 2.0 if acts[i] == "relu" else 1.0
            w = rng.standard_normal((sizes[i], sizes[i + 1])) * np.sqrt(gain / sizes[i])
            self.weights.append(w.astype(self.dtype))
            self.biases.append(np.zeros(sizes[i + 1], self.dtype))
        self.weight_grads = [np.zeros_like(w) for w in self.weights]
        self.bias_grads = [np.zeros_like(b) for b in self.biases]
        self._m = [np.zeros_like(p) for p in self.parameters.values()]
        self._v = [np.zeros_like(p) for p in self.parameters.values()]
        self._t = 0
        self._tape: list[np.ndarray] | None = None  # layer inputs and outputs of the last forward
        self._has_grads = False

    # -- the protocol -------------------------------------------------------------
    def forward(self, x, collect: Collection[str] = ()
                ) -> tuple[np.ndarray, IntermediateActivations]:
        """Training forward pass: ``(logits (B, n_outputs), activations of collect)``.

        Keeps every layer's input and output for :meth:`backward`. A collected
        activation is the layer's output ``a_l`` (after its ReLU); the arrays are
        the model's own (read them, do not modify them).
        """
        wanted = self._check_collect(collect)
        h = self._as_input(x)
        tape = [h]
        acts = IntermediateActivations()
        for i, name in enumerate(self.layer_names):
            h = self._layer(i, h)
            tape.append(h)
            if name in wanted:
                acts.add(name, h)
        self._tape = tape
        return h, acts

    def backward(self, output_grad, intermediate_grads: Mapping | None = None) -> np.ndarray:
        """Parameter gradients of ``L_out + sum_l L_l`` for the last forward.

        Args:
            output_grad: ``dL/d logits``, shape ``(B, n_outputs)``.
            intermediate_grads: ``{layer name: dL/da_l}`` (an
                :class:`IntermediateActivations` or any mapping), each of the
                layer's activation shape; added to the gradient flowing down
                when the pass reaches that layer.

        Returns:
            ``dL/dx`` (``(B, n_inputs)``), for chaining with an upstream model.
        """
        if self._tape is None:
            raise RuntimeError("backward() needs a forward() first")
        tape = self._tape
        g = self._as_grad(output_grad, "output_grad", tape[-1].shape)
        extra = {}
        for name, grad in (intermediate_grads or {}).items():
            if name not in self.layer_names:
                raise ValueError(f"intermediate_grads has unknown layer {name!r}; "
                                 f"this model's layers are {self.layer_names}")
            i = self.layer_names.index(name)
            extra[i] = self._as_grad(grad, f"intermediate_grads[{name!r}]", tape[i + 1].shape)
        for i in range(len(self.weights) - 1, -1, -1):
            if i in extra:
                g = g + extra[i]
            if self.activations[i] == "relu":
                g = g * (tape[i + 1] > 0)
            np.matmul(tape[i].T, g, out=self.weight_grads[i])
            np.sum(g, axis=0, out=self.bias_grads[i])
            g = g @ self.weights[i].T
        self._has_grads = True
        return g

    def step(self) -> None:
        """One Adam update with the gradients of the last :meth:`backward`."""
        if not self._has_grads:
            raise RuntimeError("step() needs a backward() first")
        self._t += 1
        b1, b2 = self.beta1, self.beta2
        # Python floats (not NumPy float64 scalars) keep float32 updates in float32.
        lr_t = self.learning_rate * math.sqrt(1.0 - b2 ** self._t) / (1.0 - b1 ** self._t)
        eps_t = self.eps * math.sqrt(1.0 - b2 ** self._t)
        for p, g, m, s in zip(self.parameters.values(), self.gradients.values(),
                              self._m, self._v):
            m *= b1
            m += (1.0 - b1) * g
            s *= b2
            s += (1.0 - b2) * (g * g)
            if self.weight_decay:
                p -= (self.learning_rate * self.weight_decay) * p
            # Folding the bias corrections into lr_t and eps_t is the same update
            # as Adam's m_hat / (sqrt(v_hat) + eps), with two fewer array passes.
            p -= lr_t * m / (np.sqrt(s) + eps_t)

    def predict(self, x, batch_size: int = 4096) -> np.ndarray:
        """Logits for ``x``, in chunks of ``batch_size`` rows; keeps nothing for backward."""
        h_all = self._as_input(x)
        out = np.empty((h_all.shape[0], self.layer_sizes[-1]), self.dtype)
        for start in range(0, h_all.shape[0], batch_size):
            h = h_all[start:start + batch_size]
            for i in range(len(self.weights)):
                h = self._layer(i, h)
            out[start:start + batch_size] = h
        return out

    # -- extras used by the trainer -------------------------------------------------
    @property
    def parameters(self) -> dict[str, np.ndarray]:
        """``{"<layer>.W": W, "<layer>.b": b}``: the live arrays (edit in place to perturb)."""
        return self._by_layer(self.weights, self.biases)

    @property
    def gradients(self) -> dict[str, np.ndarray]:
        """Gradients of the last :meth:`backward`, keyed like :attr:`parameters`."""
        return self._by_layer(self.weight_grads, self.bias_grads)

    @property
    def n_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters.values()))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters (used by early stopping to restore the best epoch)."""
        return {k: p.copy() for k, p in self.parameters.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy parameters from :meth:`state_dict` output (shapes must match)."""
        params = self.parameters
        if set(state) != set(params):
            raise ValueError(f"state has keys {sorted(state)}, expected {sorted(params)}")
        for k, p in params.items():
            src = np.asarray(state[k])
            if src.shape != p.shape:
                raise ValueError(f"state[{k!r}] has shape {src.shape}, expected {p.shape}")
            p[...] = src

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Copies of Adam's state (moments and step count): with :meth:`state_dict`,
        what a :class:`~kdnumba.training.Distiller` checkpoint needs to resume
        training exactly where it stopped."""
        state = {"t": np.asarray(self._t, np.int64)}
        for i, (m, s) in enumerate(zip(self._m, self._v)):
            state[f"m{i}"], state[f"v{i}"] = m.copy(), s.copy()
        return state

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`optimizer_state` output (shapes must match)."""
        expected = {"t"} | {f"{k}{i}" for i in range(len(self._m)) for k in "mv"}
        if set(state) != expected:
            raise ValueError(f"optimizer state has keys {sorted(state)}, expected "
                             f"{sorted(expected)}")
        for i, (m, s) in enumerate(zip(self._m, self._v)):
            for dst, key in ((m, f"m{i}"), (s, f"v{i}")):
                src = np.asarray(state[key])
                if src.shape != dst.shape:
                    raise ValueError(f"optimizer state[{key!r}] has shape {src.shape}, "
                                     f"expected {dst.shape}")
                dst[...] = src
        self._t = int(state["t"])

    def fingerprint(self) -> str:
        """SHA-256 of the architecture and weights (keys the teacher cache)."""
        h = hashlib.sha256()
        h.update(repr((self.layer_sizes, self.layer_names, self.activations,
                       self.dtype.str)).encode())
        for p in self.parameters.values():
            h.update(np.ascontiguousarray(p).tobytes())
        return h.hexdigest()

    def save(self, path) -> None:
        """Write architecture and weights to an ``.npz`` file (atomically and durably:
        a crash leaves the previous file, never a partial one)."""
        arrays = {"layer_sizes": np.asarray(self.layer_sizes, np.int64),
                  "layer_names": np.asarray(self.layer_names, dtype=str),
                  "activations": np.asarray(self.activations, dtype=str)}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"W{i}"], arrays[f"b{i}"] = w, b
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path, **kwargs) -> MLP:
        """An :class:`MLP` with the architecture and weights of :meth:`save`'s file;
        ``kwargs`` set the optimiser (``learning_rate``, ...)."""
        with np.load(path, allow_pickle=False) as f:
            sizes = [int(n) for n in f["layer_sizes"]]
            model = cls(sizes, layer_names=[str(s) for s in f["layer_names"]],
                        activations=[str(s) for s in f["activations"]],
                        dtype=f["W0"].dtype, **kwargs)
            for i in range(len(sizes) - 1):
                model.weights[i][...] = f[f"W{i}"]
                model.biases[i][...] = f[f"b{i}"]
        return model

    def __repr__(self) -> str:
        layers = ", ".join(f"{n}:{s}{'' if a == 'relu' else '(linear)'}" for n, s, a in
                           zip(self.layer_names, self.layer_sizes[1:], self.activations))
        return f"MLP({self.layer_sizes[0]} -> {layers}; {self.dtype.name})"

    # -- internals ------------------------------------------------------------------
    def _layer(self, i: int, h: np.ndarray) -> np.ndarray:
        z = h @ self.weights[i]
        z += self.biases[i]
        if self.activations[i] == "relu":
            np.maximum(z, 0, out=z)
        return z

    def _by_layer(self, weights, biases) -> dict[str, np.ndarray]:
        """``{"<layer>.W": weights[l], "<layer>.b": biases[l]}`` in layer order."""
        out = {}
        for name, w, b in zip(self.layer_names, weights, biases):
            out[f"{name}.W"], out[f"{name}.b"] = w, b
        return out

    def _check_collect(self, collect) -> frozenset:
        if isinstance(collect, str):
            collect = (collect,)
        wanted = frozenset(collect)
        unknown = sorted(wanted - set(self.layer_names))
        if unknown:
            raise ValueError(f"collect asks for unknown layer(s) {unknown}; "
                             f"this model's layers are {self.layer_names}")
        return wanted

    def _as_input(self, x) -> np.ndarray:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"x must be a real numeric array, got dtype {arr.dtype.name}")
        if arr.ndim != 2 or arr.shape[1] != self.layer_sizes[0]:
            raise ValueError(f"x must have shape (B, {self.layer_sizes[0]}), got {arr.shape}")
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def _as_grad(self, g, name: str, shape) -> np.ndarray:
        arr = v.as_float_array(g, name, dtype=self.dtype)
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (the activation's), got {arr.shape}")
        return arr
