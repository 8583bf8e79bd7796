"""Keras 3 bridge: kdnumba's losses as ``keras.distillation.DistillationLoss`` objects.

    >>> import kdnumba.keras as kdk
    >>> distiller = keras.distillation.Distiller(
    ...     teacher, student,
    ...     distillation_losses=[kdk.LogitsDistillation(temperature=4.0),
    ...                          kdk.RKDDistillation(teacher_layer_name="emb",
    ...                                              student_layer_name="emb")],
    ...     student_loss_weight=0.5)

Keras's :class:`keras.distillation.Distiller` calls
``loss.compute_loss(teacher_outputs, student_outputs)`` with the models' final
outputs, or with the outputs of the layers named by ``teacher_layer_name`` /
``student_layer_name`` when the loss has them (as Keras's own
``FeatureDistillation`` does). It passes **no labels**: the hard-label term is
the Distiller's ``student_loss_weight`` part, compiled as ``loss=``.

One class per registered kdnumba loss that fits that call (see
:data:`INCLUDED` and :data:`EXCLUDED`, with the reasons), derived from the
registry; each computes through kdnumba's fused kernels and gets its exact
gradient from the backend's custom-gradient mechanism:

* JAX backend: :mod:`kdnumba.jax` (``jax.custom_vjp`` over ``jax.pure_callback``;
  works inside Keras's jitted train step). :class:`LogitsDistillation`'s loss
  (KL ``kd_loss``, no labels) is an XLA FFI call there instead, with no Python
  in the step (docs/keras.md, "Speed");
* PyTorch backend: :mod:`kdnumba.torch` (a ``torch.autograd.Function``);
* any other backend (TensorFlow, NumPy, OpenVINO): importing this module
  raises ``ImportError`` naming the backend and the supported ones.

Every class is registered Keras-serializable (package ``"kdnumba"``) with
``get_config`` / ``from_config``, so a ``Distiller`` using them saves and loads
(import :mod:`kdnumba.keras` before ``keras.saving.load_model``). Options are
checked when the object is built, by kdnumba's own validation, so a bad
value (``temperature=0``) raises ``ValueError``/``TypeError`` naming it then,
not inside a compiled train step.

Student outputs in float16/bfloat16 (mixed precision) are cast to float32 for
the kernels (the cast is differentiated like any other op); the teacher's are
cast to the student's kernel dtype. Only the student side is differentiated:
the teacher is frozen by the Distiller.

:class:`KDNumbaDistillation` wraps any fitting registered loss by name, and
:func:`wrap` any ``(loss, grad)`` function (a strategy's ``loss_and_gradient``,
your own).

This module is ``kdnumba/keras.py``; its ``import keras`` is an absolute
import and loads Keras itself. Importing :mod:`kdnumba` does not import this
module, Keras or any framework.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping

import numpy as np

#: Keras backends this bridge runs on (each has a kdnumba custom-gradient bridge).
SUPPORTED_BACKENDS = ("jax", "torch")


def _unsupported(backend: str) -> str:
    return (f"kdnumba.keras supports the Keras backends {', '.join(map(repr, SUPPORTED_BACKENDS))}; "
            f"this Keras uses the {backend!r} backend. Set KERAS_BACKEND=jax or "
            f"KERAS_BACKEND=torch before importing keras (kdnumba's gradients reach Keras "
            f"through kdnumba.jax / kdnumba.torch; there is no TensorFlow bridge)")


try:
    import keras
except ImportError as exc:  # pragma: no cover - exercised in a subprocess
    # Keras defaults to TensorFlow and fails to import when it is absent: say
    # what to do rather than surfacing "No module named 'tensorflow'".
    wanted = os.environ.get("KERAS_BACKEND", "tensorflow (Keras's default)")
    if getattr(exc, "name", None) == "keras":
        raise ImportError("kdnumba.keras needs Keras 3: pip install 'kdnumba[keras]'") from exc
    raise ImportError(f"{_unsupported(wanted)}; importing keras failed: {exc}") from exc

BACKEND = keras.backend.backend()
if BACKEND == "jax":
    from kdnumba import jax as _bridge
elif BACKEND == "torch":
    from kdnumba import torch as _bridge
else:
    raise ImportError(_unsupported(BACKEND))

from kdnumba import functional  # noqa: E402
from kdnumba.bridges import LossAdapter  # noqa: E402

ops = keras.ops

# --- which registered losses fit Keras's call ---------------------------------

#: Losses that need class labels the Distiller does not pass, and how they get
#: them here: DKD decouples the target class from the rest, and in
#: distillation the teacher's top class stands in for it (documented in
#: docs/keras.md; on training data the teacher mostly agrees with the labels).
PSEUDO_LABELS = {"dkd_loss": "labels"}

#: Registered losses left out, and why (also in docs/keras.md). Anything else
#: registered whose arguments are ``(student, teacher, <optional arrays>)``
#: gets a class automatically.
EXCLUDED = {
    "sparse_kd_loss": "its teacher is a stored top-K (logits, indices) pair; the Distiller runs "
                      "the teacher live, so use LogitsDistillation on the full logits",
    "supervised_contrastive": "its positives are defined by the true class labels, which "
                              "Keras's compute_loss does not receive",
    "triplet_loss": "it uses only the student's embeddings and the true labels (no teacher "
                    "output), which Keras's compute_loss does not receive",
    "crd_loss": "it needs dataset indices, a memory bank and trains teacher-side heads "
                "(two gradients); use kdnumba.CRDStrategy with kdnumba's own training loop",
}

#: Keras class names (registry name -> class); new losses get ``<Camel>Distillation``.
CLASS_NAMES = {
    "kd_loss": "LogitsDistillation",
    "dkd_loss": "DKDDistillation",
    "dist_loss": "DISTDistillation",
    "feature_loss": "FitNetsDistillation",
    "attention_transfer": "AttentionTransferDistillation",
    "attention_map_loss": "AttentionMapDistillation",
    "nt_xent": "NTXentDistillation",
    "info_nce": "InfoNCEDistillation",
    "rkd_loss": "RKDDistillation",
    "sp_loss": "SPDistillation",
    "pkt_loss": "PKTDistillation",
    "nst_loss": "NSTDistillation",
    "hcl_loss": "HCLDistillation",
    "selectivity_loss": "SelectivityDistillation",
}

#: One-line formulas for the docstrings (``s`` student, ``t`` teacher, ``B`` rows).
FORMULAS = {
    "kd_loss": "T^2 / B * sum_i KL(softmax(t_i/T) || softmax(s_i/T))  (Hinton et al. 2015; "
               "divergence= also 'reverse_kl', 'jsd', 'tvd')",
    "dkd_loss": "T^2/B * (alpha * TCKD + beta * NCKD), target class g_i = argmax_c t_ic "
                "(Zhao et al. 2022)",
    "dist_loss": "T^2 * (beta * (1 - mean_i pearson(p_s[i,:], p_t[i,:])) + gamma * (1 - mean_c "
                 "pearson(p_s[:,c], p_t[:,c]))), p = softmax(z/T) (Huang et al. 2022)",
    "feature_loss": "mean (s - t)^2  (FitNets, Romero et al. 2015)",
    "attention_transfer": "mean (a(s) - a(t))^2, a(f) = normalize(mean_c f^p) "
                          "(Zagoruyko & Komodakis 2017)",
    "attention_map_loss": "MSE, or KL over the last axis, between attention maps (B, ..., L)",
    "nt_xent": "mean_i [-cos(s_i,t_i)/tau + log sum_j exp(cos(s_i,t_j)/tau)]",
    "info_nce": "mean_i [-cos(t_i,s_i)/tau + log sum_j exp(cos(t_i,s_j)/tau)]",
    "rkd_loss": "distance_weight * smoothL1(d_s/mean d_s - d_t/mean d_t) + angle_weight * "
                "smoothL1(angle_s - angle_t)  (Park et al. 2019)",
    "sp_loss": "sum (N_s - N_t)^2 / B^2, N = row-normalised Gram f f^T  (Tung & Mori 2019)",
    "pkt_loss": "mean p_t log((p_t + eps) / (p_s + eps)), p = row-normalised (cos + 1)/2 "
                "kernel  (Passalis & Tefas 2018)",
    "nst_loss": "mean K(t,t) + mean K(s,s) - 2 mean K(s,t), K(x,y)_bjk = (x_bj . y_bk)^2 on "
                "L2-normalised channels  (Huang & Wang 2017)",
    "hcl_loss": "(mse + sum_l w_l mse(pool_l)) / (1 + sum_l w_l), levels 4, 2, 1  (ReviewKD)",
    "selectivity_loss": "weight * mean_n (sel_n(s) - sel_n(t))^2, sel over the batch "
                        "(variance / relaxed sparsity / peak-to-average)",
}

#: Losses that read feature maps as (B, C, *spatial): under Keras's
#: channels-last layout the maps are transposed to channels-first first
#: (option ``data_format``). The others flatten each row (layout-free).
CHANNELS_FIRST = frozenset({"attention_transfer", "nst_loss", "hcl_loss"})

#: Losses whose student and teacher arrays must have the same shape (checked
#: when traced, so the error is a ValueError and not one inside a callback).
SAME_SHAPE = frozenset({"kd_loss", "dkd_loss", "dist_loss", "feature_loss", "hcl_loss",
                        "attention_map_loss", "selectivity_loss"})

#: Options the bridge decides: ``device`` follows the tensors, ``out`` is a
#: kernel buffer; kd_loss's ``alpha`` weights a hard-label term the Distiller
#: computes itself (``student_loss_weight``).
HIDDEN = {"*": ("device", "out"), "kd_loss": ("alpha",)}

_HALF = ("float16", "bfloat16")


def _fits(spec) -> bool:
    """``(student, teacher, <optional arrays>)``, one gradient: Keras's call shape."""
    params = spec.signature.parameters
    arrays = spec.array_params
    if len(spec.grad_wrt) != 1 or len(arrays) < 2 or not arrays[1].startswith("teacher"):
        return False
    required = [p for p in arrays[2:] if params[p].default is not None]
    return all(p == PSEUDO_LABELS.get(spec.name) for p in required)


def _class_name(name: str) -> str:
    if name in CLASS_NAMES:
        return CLASS_NAMES[name]
    stem = name[:-5] if name.endswith("_loss") else name
    return "".join(p[:1].upper() + p[1:] for p in stem.split("_")) + "Distillation"


def _specs() -> dict:
    return {spec.name: spec for spec in functional.specs()}


#: Registered losses with a class here, in registry order.
INCLUDED = tuple(name for name, spec in _specs().items()
                 if name not in EXCLUDED and _fits(spec))


# --- argument checks -----------------------------------------------------------

def _check_layer_name(value, name: str, where: str):
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{where}: {name} must be a layer name (str) or None, "
                        f"got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: {name} must be a non-empty layer name or None")
    return value


def _check_data_format(value, where: str) -> str:
    value = keras.config.image_data_format() if value is None else value
    if value not in ("channels_last", "channels_first"):
        raise ValueError(f"{where}: data_format must be 'channels_last' or 'channels_first' "
                         f"(or None for keras.config.image_data_format()), got {value!r}")
    return value


def _single_pairs(teacher_outputs, student_outputs, where: str):
    """Matching (teacher, student) leaves of two output structures."""
    keras.tree.assert_same_structure(teacher_outputs, student_outputs)
    teachers = keras.tree.flatten(teacher_outputs)
    students = keras.tree.flatten(student_outputs)
    if not students:
        raise ValueError(f"{where}: the model outputs are empty")
    return list(zip(teachers, students))


def _dtype(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _static_shape(x):
    return tuple(None if d is None else int(d) for d in ops.shape(x))


def _model_layers(model) -> str:
    return ", ".join(repr(layer.name) for layer in getattr(model, "layers", ())) or "none"


# --- the loss objects -----------------------------------------------------------

class _Distillation(keras.distillation.DistillationLoss):
    """What every kdnumba Keras loss shares: the layer names, the structure
    and shape checks, the dtype handling and the backend call."""

    def __init__(self, teacher_layer_name, student_layer_name):
        where = type(self).__name__
        self.teacher_layer_name = _check_layer_name(teacher_layer_name, "teacher_layer_name", where)
        self.student_layer_name = _check_layer_name(student_layer_name, "student_layer_name", where)
        if self.student_layer_name is not None and self.teacher_layer_name is None:
            # Keras 3.15's Distiller only extracts layers when teacher_layer_name
            # is set; a lone student_layer_name would silently compare final outputs.
            raise ValueError(f"{where}: student_layer_name={self.student_layer_name!r} needs "
                             "teacher_layer_name too (Keras's Distiller reads intermediate "
                             "layers only when teacher_layer_name is set)")

    # hooks for subclasses
    def _call_pair(self, teacher, student):
        raise NotImplementedError

    def _check_pair(self, teacher, student):
        ts, ss = _static_shape(teacher), _static_shape(student)
        if len(ss) < 1 or len(ts) < 1:
            raise ValueError(f"{type(self).__name__}: outputs need a batch axis, got teacher "
                             f"shape {ts} and student shape {ss}")
        if None not in (ts[0], ss[0]) and ts[0] != ss[0]:
            raise ValueError(f"{type(self).__name__}: batch size mismatch, teacher {ts[0]} "
                             f"vs student {ss[0]}")

    def validate_model_compatibility(self, teacher, student):
        """Each configured layer exists in its model, which must be Functional or
        Sequential (``ValueError`` naming the model and the layers it has)."""
        where = type(self).__name__
        for side, model, layer in (("teacher", teacher, self.teacher_layer_name),
                                   ("student", student, self.student_layer_name)):
            if layer is None:
                continue
            if getattr(model, "inputs", None) is None:
                raise ValueError(f"{where}: {side}_layer_name={layer!r} needs a Functional or "
                                 f"Sequential {side} model; the {side} is subclassed (no symbolic "
                                 "inputs)")
            try:
                model.get_layer(name=layer)
            except ValueError:
                raise ValueError(f"{where}: the {side} model has no layer {layer!r} "
                                 f"(layers: {_model_layers(model)})") from None

    def validate_outputs(self, teacher_outputs, student_outputs):
        """Same structure, and per leaf the shape rules of the loss."""
        for t, s in _single_pairs(teacher_outputs, student_outputs, type(self).__name__):
            self._check_pair(t, s)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        """The loss (a scalar), summed over the leaves of multi-output structures."""
        total = None
        for t, s in _single_pairs(teacher_outputs, student_outputs, type(self).__name__):
            self._check_pair(t, s)
            if _dtype(s) in _HALF:  # the kernels run float32/float64
                s = ops.cast(s, "float32")
            if _dtype(t) != _dtype(s):
                t = ops.cast(t, _dtype(s))
            value = self._call_pair(ops.stop_gradient(t), s)
            total = value if total is None else total + value
        return total

    def _layer_config(self) -> dict:
        return {"teacher_layer_name": self.teacher_layer_name,
                "student_layer_name": self.student_layer_name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _public_options(spec) -> list[inspect.Parameter]:
    hidden = set(HIDDEN["*"]) | set(HIDDEN.get(spec.name, ()))
    return [p for p in spec.signature.parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in hidden]


def _dummy_arrays(spec, pseudo: bool):
    """Small valid float32 inputs of ``spec``: to run kdnumba's validation of the options."""
    inputs = spec.make_inputs(np.random.default_rng(0), "float32")
    arrays = [inputs[spec.array_params[0]], inputs[spec.array_params[1]]]
    if pseudo:
        arrays.append(inputs[PSEUDO_LABELS[spec.name]])
    return arrays


@keras.saving.register_keras_serializable(package="kdnumba")
class KDNumbaDistillation(_Distillation):
    """Any registered kdnumba loss that fits Keras's call, by name.

    ``KDNumbaDistillation("dist_loss", temperature=4.0)`` is
    ``DISTDistillation(temperature=4.0)``; the named classes below are this
    class with ``loss`` fixed. ``loss`` must be one of :data:`INCLUDED`
    (``ValueError`` otherwise, saying why an excluded one is left out).
    Options are the functional loss's keyword options less ``device`` and
    ``out`` (and kd_loss's ``alpha``), checked now.

    Args:
        loss: the registry name, e.g. ``"rkd_loss"``.
        teacher_layer_name: teacher layer whose output is compared (``None``:
            the model's output).
        student_layer_name: student layer (``None``: the model's output);
            needs ``teacher_layer_name``.
        data_format: for the feature-map losses (``attention_transfer``,
            ``nst_loss``, ``hcl_loss``): ``"channels_last"`` or
            ``"channels_first"``; ``None`` reads ``keras.config.image_data_format()``.
        **options: the loss's options (``temperature=``, ``beta=``...).
    """

    loss_name: str | None = None  # fixed by the named subclasses

    def __init__(self, loss=None, *, teacher_layer_name=None, student_layer_name=None,
                 data_format=None, **options):
        where = type(self).__name__
        if self.loss_name is not None:
            if loss is not None and loss != self.loss_name:
                raise TypeError(f"{where} computes {self.loss_name}; it takes no loss= argument")
            loss = self.loss_name
        if not isinstance(loss, str):
            raise TypeError(f"{where}: loss must be the name of a kdnumba loss (str), "
                            f"got {type(loss).__name__}")
        if loss in EXCLUDED:
            raise ValueError(f"{where}: loss={loss!r} is not available in Keras: {EXCLUDED[loss]}")
        if loss not in INCLUDED:
            raise ValueError(f"{where}: unknown loss {loss!r}; available: {', '.join(INCLUDED)}")
        super().__init__(teacher_layer_name, student_layer_name)
        spec = _specs()[loss]
        self.loss = loss
        if loss in CHANNELS_FIRST:
            self.data_format = _check_data_format(data_format, where)
        elif data_format is not None:
            raise TypeError(f"{where}: data_format applies only to the feature-map losses "
                            f"({', '.join(sorted(CHANNELS_FIRST))}), not {loss}")
        else:
            self.data_format = None
        public = _public_options(spec)
        known = {p.name for p in public}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"{where}: unknown option(s) {', '.join(unknown)} for {loss}; "
                            f"options: {', '.join(sorted(known)) or 'none'}")
        # every option explicit, so the saved config does not depend on defaults
        self.options = {p.name: options.get(p.name, p.default) for p in public}
        pseudo = loss in PSEUDO_LABELS
        try:  # kdnumba validates options before arrays: a bad value raises here, named
            spec.function(*_dummy_arrays(spec, pseudo), **self.options, device="cpu")
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        self._pseudo_labels = pseudo
        self._fn = getattr(_bridge, loss)

    def _check_pair(self, teacher, student):
        super()._check_pair(teacher, student)
        if self.loss in SAME_SHAPE:
            ts, ss = _static_shape(teacher), _static_shape(student)
            if ts != ss:
                raise ValueError(f"{type(self).__name__} ({self.loss}): teacher and student "
                                 f"outputs must have the same shape, got teacher {ts} and "
                                 f"student {ss}")
        if self.data_format is not None and len(_static_shape(student)) < 3:
            raise ValueError(f"{type(self).__name__} ({self.loss}): expects feature maps "
                             f"(B, ..., C) or (B, C, ...), got shape {_static_shape(student)}")

    def _call_pair(self, teacher, student):
        if self.data_format == "channels_last":
            # kdnumba's map losses read (B, C, *spatial); the transpose is differentiated
            perm = (0, len(student.shape) - 1, *range(1, len(student.shape) - 1))
            student = ops.transpose(student, perm)
            teacher = ops.transpose(teacher, (0, len(teacher.shape) - 1,
                                              *range(1, len(teacher.shape) - 1)))
        extra = (ops.argmax(teacher, axis=-1),) if self._pseudo_labels else ()
        return self._fn(student, teacher, *extra, **self.options)

    def get_config(self):
        config = {} if self.loss_name is not None else {"loss": self.loss}
        config.update(self._layer_config())
        if self.data_format is not None:
            config["data_format"] = self.data_format
        config.update(self.options)
        return config


def _named_class(spec) -> type:
    """The importable class of one registered loss (``KDNumbaDistillation`` with
    ``loss`` fixed), with its own signature and docstring."""
    name = _class_name(spec.name)
    options = _public_options(spec)
    extra = ([inspect.Parameter("data_format", inspect.Parameter.KEYWORD_ONLY, default=None)]
             if spec.name in CHANNELS_FIRST else [])
    layer_params = [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=None)
                    for p in ("teacher_layer_name", "student_layer_name")]
    signature = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                                   *options, *layer_params, *extra])

    def __init__(self, **kwargs):
        KDNumbaDistillation.__init__(self, **kwargs)

    __init__.__signature__ = signature
    summary = (inspect.getdoc(spec.function) or "").splitlines()[0].rstrip(".")
    option_lines = "\n".join(f"        {p.name}={p.default!r}" for p in options) or "        (none)"
    pseudo = (f"\n\n    Keras passes no labels, so the target class of row i is the teacher's\n"
              f"    top class ``argmax_c t_ic`` (constant; no gradient)."
              if spec.name in PSEUDO_LABELS else "")
    layout = ("\n\n    Feature maps: ``data_format='channels_last'`` (Keras's default) maps are\n"
              "    transposed to kdnumba's (B, C, *spatial) first."
              if spec.name in CHANNELS_FIRST else "")
    doc = (f"{summary}, for ``keras.distillation.Distiller``; ``kdnumba.functional.{spec.name}``.\n\n"
           f"    loss = {FORMULAS.get(spec.name, spec.name)}{pseudo}{layout}\n\n"
           f"    Computed by kdnumba's fused kernel with its exact gradient (JAX: custom_vjp;\n"
           f"    PyTorch: autograd.Function). Options (checked now; see the functional\n"
           f"    loss for their meaning)::\n\n{option_lines}\n\n"
           f"    ``teacher_layer_name`` / ``student_layer_name``: compare those layers'\n"
           f"    outputs instead of the models' outputs (as Keras's FeatureDistillation).")
    cls = type(name, (KDNumbaDistillation,), {
        "loss_name": spec.name, "__init__": __init__, "__doc__": doc, "__module__": __name__,
        "__qualname__": name})
    return keras.saving.register_keras_serializable(package="kdnumba", name=name)(cls)


_CLASSES = {name: _named_class(_specs()[name]) for name in INCLUDED}
globals().update({cls.__name__: cls for cls in _CLASSES.values()})

LogitsDistillation = _CLASSES["kd_loss"]
LogitsDistillation.__doc__ += """

    This is the Hinton loss: softmax at temperature T on both sides, KL(teacher ||
    student), times T^2, batch mean. Keras 3.15's own
    ``keras.distillation.LogitsDistillation(temperature=T)`` (default
    ``loss="kl_divergence"``) differs: the string resolves to the *function*
    ``keras.losses.kl_divergence``, not a ``KLDivergence`` instance, so Keras
    skips its softmax branch and applies ``sum y log(y / y_pred)`` (clipped to
    [1e-7, 1]) to the raw logits divided by T, with no T^2. Measured with
    ``rng = np.random.default_rng(0)``, student then teacher logits
    ``2 * rng.standard_normal((64, 10))`` (float32), T=3, both backends:
    Keras's default 17.03, the Hinton loss 3.20 (this class; also what Keras
    gives with ``loss=keras.losses.KLDivergence()`` passed as an instance, the
    one way to get its softmax and T^2 branch). The gap depends on the inputs
    (the issue quotes about 20.8 vs 5.8 on other logits).
"""


class FunctionDistillation(_Distillation):
    """Any ``(loss, grad)`` function as a Keras distillation loss (see :func:`wrap`)."""

    def __init__(self, fn: Callable, *, name: str | None = None, teacher_layer_name=None,
                 student_layer_name=None, options: Mapping | None = None):
        super().__init__(teacher_layer_name, student_layer_name)
        if isinstance(fn, Mapping):  # from a saved config
            fn = keras.saving.deserialize_keras_object(fn)
        adapter = LossAdapter.of(fn, name)  # TypeError for non-callables and *args
        if len(adapter.array_params) < 2:
            raise TypeError(f"wrap: {adapter.name} must take (student, teacher, ...) array "
                            f"arguments, got ({', '.join(adapter.array_params)})")
        self.fn, self.name = fn, adapter.name
        self.options = dict(options or {})
        self._fn = _bridge.wrap(fn, adapter.name)
        self._fn_signature = inspect.signature(self._fn)
        try:
            self._fn_signature.bind(None, None, **self.options)
        except TypeError as exc:
            raise TypeError(f"wrap({adapter.name}): bad options: {exc}") from None

    def _call_pair(self, teacher, student):
        return self._fn(student, teacher, **self.options)

    def get_config(self):
        return {"fn": keras.saving.serialize_keras_object(self.fn), "name": self.name,
                **self._layer_config(), "options": dict(self.options)}


keras.saving.register_keras_serializable(package="kdnumba")(FunctionDistillation)


def wrap(fn: Callable, *, name: str | None = None, teacher_layer_name=None,
         student_layer_name=None, **options) -> FunctionDistillation:
    """A Keras distillation loss computing ``fn(student, teacher, **options)``.

    ``fn(x, t, *others, **options) -> (loss, d loss / d x)`` on NumPy arrays,
    as for :func:`kdnumba.jax.wrap` / :func:`kdnumba.torch.wrap`: a kdnumba
    functional loss, a strategy's bound ``loss_and_gradient`` or your own. It
    is called with the student's and the teacher's outputs (further array
    arguments get their defaults) and differentiated with respect to the
    student only. To save and load a Distiller using it, ``fn`` must be
    Keras-serializable (``keras.saving.register_keras_serializable()`` on a
    module-level function).

    >>> kdk.wrap(kdnumba.functional.kd_loss, temperature=2.0, alpha=0.0)
    """
    return FunctionDistillation(fn, name=name, teacher_layer_name=teacher_layer_name,
                                student_layer_name=student_layer_name, options=options)


__all__ = ["BACKEND", "EXCLUDED", "INCLUDED", "SUPPORTED_BACKENDS", "FunctionDistillation",
           "KDNumbaDistillation", "wrap", *(cls.__name__ for cls in _CLASSES.values())]
