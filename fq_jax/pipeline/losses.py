"""Training losses (pure): cross-entropy and knowledge distillation from a frozen teacher.

Distillation (Hinton et al. 2015) with the dense model as teacher:

    loss = (1 - w) CE(student, labels) + w T^2 KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the soft term's gradient on the scale of the hard term's as T grows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class Distillation:
  """Settings of distillation from the frozen teacher.

  Attributes:
    weight: w in [0, 1] (0: plain cross-entropy).
    temperature: T > 0 of both softened softmaxes.
  """

  weight: float
  temperature: float


def cross_entropy(logits, labels, mask=None):
  """Mean (or mask-weighted mean) softmax cross-entropy with integer labels."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def soft_kl(teacher_logits, student_logits, temperature: float):
  """Batch mean of KL(softmax(teacher / T) || softmax(student / T)).

  Args:
    teacher_logits: [batch, classes] (no gradient flows into them).
    student_logits: [batch, classes].
    temperature: T > 0.

  Returns:
    A float32 scalar.
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_p = jax.nn.log_softmax(t, axis=-1)
  log_q = jax.nn.log_softmax(s, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def distillation_loss(student_logits, teacher_logits, labels, settings: Distillation | None):
  """(1 - w) CE + w T^2 KL(teacher || student); plain CE when settings is None or w is 0.

  Args:
    student_logits: [batch, classes].
    teacher_logits: [batch, classes] of the frozen teacher (ignored when off).
    labels: [batch] integer labels.
    settings: weight and temperature, or None.

  Returns:
    The batch's mean loss (float32 scalar).
  """
  ce = cross_entropy(student_logits, labels)
  if settings is None or settings.weight == 0:
    return ce  # exactly the plain loss: no soft term is traced at all
  w, temp = settings.weight, settings.temperature
  return (1.0 - w) * ce + w * temp**2 * soft_kl(teacher_logits, student_logits, temp)
