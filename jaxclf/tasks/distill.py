"""Knowledge distillation as a loss term: a fixed teacher's logits, computed inside the jitted train step.

The teacher is an NNX graphdef (static) and its variables, which the step receives as an argument
(`Loss.frozen`, sharded like the student's params, not donated and not baked into the program
as constants). It sees the same (mixed) batch as the student: the student's normalised images
are mapped back to [0, 1] and normalised with the teacher's own mean/std, which commutes with
mixup and cutmix (both are convex combinations per pixel), then resized with `jax.image.resize`
(bilinear, antialiased) where the teacher expects another input size. No gradient flows into it.

Two modes (Hinton et al., 2015): "soft", T^2 * KL(softmax(t / T) || softmax(s / T)); "hard", the
cross-entropy against the teacher's argmax. The same term, restricted to some classes, is
Learning-without-Forgetting (Li & Hoiem, 2016): the old model's logits on the old classes
(tasks/continual.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxclf import config as config_lib, models, weights
from jaxclf.tasks import base
from jaxclf.training import steps

MODES = ("soft", "hard")


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A fixed model a loss term reads, in eval mode, with its own preprocessing and class columns.

    `name` keys its variables in `Loss.frozen`; `image_size` (height, width) is what its images
    are resized to (None: the student's as they are); `columns` are the logit columns the term
    compares, teacher's and student's, in matching order (None: all, the same classes in order).
    """

    name: str
    graphdef: nnx.GraphDef
    state: nnx.State
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int] | None = None
    teacher_columns: np.ndarray | None = None
    student_columns: np.ndarray | None = None

    @classmethod
    def from_model(cls, name: str, model: nnx.Module, *, mean: Sequence[float], std: Sequence[float],
                   image_size: tuple[int, int] | None = None, teacher_columns=None, student_columns=None) -> Teacher:
        model.eval()
        graphdef, state = nnx.split(model)
        return cls(name, graphdef, state, tuple(mean), tuple(std), image_size,
                   None if teacher_columns is None else np.asarray(teacher_columns, np.int32),
                   None if student_columns is None else np.asarray(student_columns, np.int32))

    def logits(self, state: nnx.State, images: jax.Array, student_mean: Sequence[float],
               student_std: Sequence[float]) -> jax.Array:
        """float32[B, C'] teacher logits (its `teacher_columns`) for the student's normalised images [B, H, W, 3]."""
        images = to_teacher_input(images, student_mean, student_std, self.mean, self.std, self.image_size)
        logits = nnx.merge(self.graphdef, state)(images).astype(jnp.float32)
        if self.teacher_columns is not None:
            logits = logits[:, self.teacher_columns]
        return jax.lax.stop_gradient(logits)

    def student_logits(self, logits: jax.Array) -> jax.Array:
        return logits if self.student_columns is None else logits[:, self.student_columns]


def to_teacher_input(images: jax.Array, student_mean, student_std, teacher_mean, teacher_std,
                     image_size: tuple[int, int] | None) -> jax.Array:
    """Re-normalise the student's images for the teacher and resize them to `image_size` (if given and different)."""
    if tuple(student_mean) != tuple(teacher_mean) or tuple(student_std) != tuple(teacher_std):
        raw = images * jnp.asarray(student_std, jnp.float32) + jnp.asarray(student_mean, jnp.float32)
        images = (raw - jnp.asarray(teacher_mean, jnp.float32)) / jnp.asarray(teacher_std, jnp.float32)
    if image_size is not None and tuple(images.shape[1:3]) != tuple(image_size):
        images = jax.image.resize(images, (images.shape[0], *image_size, images.shape[3]), "linear", antialias=True)
    return images


def soft_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Per example: T^2 * KL(softmax(teacher / T) || softmax(student / T)), float32[B]."""
    teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    student_log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return temperature**2 * kl


def hard_cross_entropy(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Per example: cross-entropy of the student against the teacher's argmax, float32[B]."""
    targets = jax.nn.one_hot(jnp.argmax(teacher_logits, axis=-1), teacher_logits.shape[-1])
    return -jnp.sum(targets * jax.nn.log_softmax(student_logits, axis=-1), axis=-1)


def distillation_term(teacher: Teacher, *, weight: float, mode: str, temperature: float,
                      student_mean: Sequence[float], student_std: Sequence[float]):
    """The loss term `weight` * the (example-weighted) mean distillation loss over the batch, as a
    function of `steps.LossInputs`; the teacher's variables come from `inputs.frozen[teacher.name]`."""
    if mode not in MODES:
        raise ValueError(f"distillation mode {mode!r}: use one of {MODES}")
    if mode == "soft" and not temperature > 0:
        raise ValueError(f"distillation temperature {temperature}: use a value > 0")
    student_mean, student_std = tuple(student_mean), tuple(student_std)

    def term(inputs) -> jax.Array:
        teacher_logits = teacher.logits(inputs.frozen[teacher.name], inputs.images, student_mean, student_std)
        student_logits = teacher.student_logits(inputs.logits)
        if mode == "soft":
            losses = soft_kl(student_logits, teacher_logits, temperature)
        else:
            losses = hard_cross_entropy(student_logits, teacher_logits)
        return weight * jnp.sum(losses * inputs.weights) / inputs.weight_sum

    return term


class Distillation(base.Task):
    """The task of a run with config.distill.teacher (and alpha > 0): (1 - alpha) * the loss so far
    + alpha * the distillation term on the teacher's logits."""

    name = "distill"

    @classmethod
    def applies(cls, config: ml_collections.ConfigDict, pretrained_info: object | None) -> bool:
        return bool(config.distill.teacher) and config.distill.alpha != 0

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, pretrained_info: object | None) -> list[str]:
        spec = config.distill
        if not cls.applies(config, pretrained_info):
            return []
        if not 0 < spec.alpha <= 1:
            raise config_lib.ConfigError(f"config.distill.alpha={spec.alpha}: use a value in [0, 1] (0: off)")
        if spec.mode not in MODES:
            raise config_lib.ConfigError(f"config.distill.mode={spec.mode!r}: use one of {MODES}")
        if spec.mode == "soft" and not spec.temperature > 0:
            raise config_lib.ConfigError(f"config.distill.temperature={spec.temperature}: use a value > 0")
        if spec.dtype != "auto" and spec.dtype not in models.DTYPES:
            raise config_lib.ConfigError(f"config.distill.dtype={spec.dtype!r}: use 'auto', 'float32' or 'bfloat16'")
        return []

    def loss(self, loss: steps.Loss, class_names: Sequence[str]) -> steps.Loss:
        return with_distillation(loss, load_teacher(self.config, class_names), self.config)


def with_distillation(loss: steps.Loss, teacher: Teacher, config: ml_collections.ConfigDict) -> steps.Loss:
    """(1 - alpha) * `loss` + alpha * the distillation term of `teacher` (config.distill.*; the student's
    images are normalised with config.data.mean/std); `loss` itself when alpha is 0."""
    spec = config.distill
    if spec.alpha == 0:
        return loss
    term = distillation_term(teacher, weight=spec.alpha, mode=spec.mode, temperature=spec.temperature,
                             student_mean=config.data.mean, student_std=config.data.std)
    return loss.scaled(1 - spec.alpha).plus("distill", term, {teacher.name: teacher.state})


def load_teacher(config: ml_collections.ConfigDict, class_names: Sequence[str]) -> Teacher:
    """The teacher config.distill.teacher names, for a student of `class_names`, in config.distill.dtype.

    A workdir teacher's classes are matched to the student's by name (they must be the same set);
    other weights must have the student's class count, in the student's order.
    """
    spec = config.distill
    dtype = config.dtype if spec.dtype == "auto" else spec.dtype
    try:
        model, info = weights.load_pretrained(spec.teacher, dtype=models.DTYPES[dtype])
    except (weights.WeightsError, ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"config.distill.teacher={spec.teacher!r}: {e}") from None
    columns = _teacher_columns(spec.teacher, getattr(info, "class_names", ()), info.num_classes, class_names)
    size = info.preprocessing.get("input_size") if spec.image_size == 0 else (spec.image_size, spec.image_size)
    if isinstance(size, int):
        size = (size, size)
    return Teacher.from_model("distill", model, mean=info.preprocessing["mean"], std=info.preprocessing["std"],
                              image_size=None if size is None else tuple(size), teacher_columns=columns)


def _teacher_columns(source: str, teacher_names: Sequence[str], teacher_classes: int,
                     class_names: Sequence[str]) -> np.ndarray | None:
    """The teacher's logit column of each student class (None: the same order), checked."""
    if not teacher_names:
        if teacher_classes != len(class_names):
            raise config_lib.ConfigError(
                f"config.distill.teacher={source!r} has {teacher_classes} classes, the data {len(class_names)}: "
                "a teacher must predict the student's classes (fine-tune it on this data first)"
            )
        return None
    missing, extra = sorted(set(class_names) - set(teacher_names)), sorted(set(teacher_names) - set(class_names))
    if missing or extra:
        raise config_lib.ConfigError(
            f"config.distill.teacher={source!r} has other classes than the data: the data's {missing[:5]} are not "
            f"the teacher's, the teacher's {extra[:5]} are not the data's; a teacher must predict the student's classes"
        )
    columns = np.asarray([list(teacher_names).index(name) for name in class_names], np.int32)
    return None if (columns == np.arange(len(columns))).all() else columns
