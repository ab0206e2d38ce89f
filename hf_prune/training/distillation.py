"""Knowledge distillation from the dense model while a `transformers.Trainer` trains the pruned one.

The training loss becomes

    L = α·T²·KL(p_T ‖ p_S) + (1 − α)·L_task,    p = softmax(z / T),

with `z` the teacher's and the student's logits, `T` the temperature and `L_task` the loss the model
itself returns (next-token cross-entropy, classification cross-entropy). The KL term is a sum over the
vocabulary (classes) at every item the task loss counts: for a causal LM the shifted positions whose
label is not -100, for an image classifier every image. It is reduced the way the task loss is: divided by
the Trainer's `num_items_in_batch` when the model receives it (the token count of the whole accumulated
step, so gradient accumulation gives the gradient of the large batch), otherwise averaged over the
micro-batch's items (and the Trainer divides both terms by the accumulation steps alike). The `T²` keeps
the soft targets' gradient scale independent of `T` (Hinton et al. 2015, "Distilling the Knowledge in a
Neural Network"). Distilling a pruned LLM from its unpruned parent is the recovery of Minitron
(Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"), whose
best results use this logit loss alone; Sheared-LLaMA (Xia et al. 2024) recovers by continued pre-training.

How it is added without a `Trainer` subclass: a forward pre-hook and a forward hook on the student
(the module the Trainer calls). The pre-hook runs the teacher on the same inputs (no labels, `no_grad`,
eval mode, the run's bf16/fp16 autocast) before the student's forward builds its graph; the hook replaces
`output.loss` by `L`. Both act only on training forwards (`module.training` and grad enabled) that carry
`labels`, so evaluation reports the task loss alone, as without distillation.

The teacher is (i) the model a user passes (same vocabulary / classes, checked), (ii) for a PEFT student,
the same model with its adapters disabled and the masked base slices restored for the teacher's forward
(no second copy of the model; the masked slices' original values are kept, a fraction of the masked
projections), or (iii) a frozen deep copy of the student taken before anything is masked.

A hidden-state term at the kept layers (Minitron's intermediate-state loss) is not implemented.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import TeacherMismatchError, UsageError

#: The Module attributes holding hooks; emptied on the teacher (a copy) and while it runs (a PEFT student).
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@dataclass(frozen=True)
class Distillation:
    """Settings of the distillation loss `α·T²·KL(teacher ‖ student at T) + (1 − α)·task loss`.

    Args:
        alpha: weight of the distillation term; `1 − alpha` weighs the model's own task loss.
        temperature: `T`, dividing both models' logits before the softmax.
        teacher: the teacher model (same vocabulary or classes as the student); `None`: the unpruned
            student itself, frozen at the start of training (PEFT students: the base with adapters disabled).
    """

    alpha: float = 0.5
    temperature: float = 1.0
    teacher: nn.Module | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"Distillation(alpha={self.alpha}) must lie in [0, 1].")
        if not self.temperature > 0:
            raise UsageError(f"Distillation(temperature={self.temperature}) must be positive.")
        if self.teacher is not None and not isinstance(self.teacher, nn.Module):
            raise UsageError(f"Distillation(teacher=...) must be a torch module, got {type(self.teacher).__name__}.")

    @classmethod
    def coerce(cls, distill: bool | Distillation | None) -> Distillation | None:
        """`distill=` as the callbacks take it: `None`/`False` off, `True` the defaults, or the settings."""
        if distill is None or distill is False:
            return None
        if distill is True:
            return cls()
        if isinstance(distill, Distillation):
            return distill
        raise UsageError(f"distill must be None, True or a Distillation(...), got {type(distill).__name__}.")

    def arguments(self) -> str:
        """The keyword as Python source (a passed teacher is named `teacher`), for the model card's snippet."""
        teacher = ", teacher=teacher" if self.teacher is not None else ""
        return f"distill=Distillation(alpha={self.alpha:g}, temperature={self.temperature:g}{teacher})"


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    shift: bool,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """`T²·Σ_items KL(p_T ‖ p_S)` over the items whose label is not -100, divided by `num_items_in_batch`
    (or, without it, by the number of those items); `shift` aligns position `i`'s logits with label `i+1`."""
    if labels.dtype.is_floating_point or labels.shape != student_logits.shape[:-1]:
        raise UsageError(
            f"distillation needs one class (token) label per item: labels of shape {tuple(labels.shape)} "
            f"({labels.dtype}) do not index logits of shape {tuple(student_logits.shape)}."
        )
    if shift:  # no shifted copy of the logits: the last position is simply not counted
        valid = torch.zeros_like(labels, dtype=torch.bool)
        valid[..., :-1] = labels[..., 1:] != -100
    else:
        valid = labels != -100
    with torch.autocast(student_logits.device.type, enabled=False):
        student, teacher = student_logits.float(), teacher_logits.float()
        if temperature != 1:
            student, teacher = student / temperature, teacher / temperature
        # KL(p_T ‖ p_S) = Σ_v p_T (t − s) + logsumexp(s) − logsumexp(t): a few passes over the vocabulary and
        # no log-softmax tensor of the student (the gradient is softmax(s) − p_T); exactly 0 when s = t.
        with torch.no_grad():
            teacher_norm = torch.logsumexp(teacher, dim=-1, keepdim=True)
            probabilities = (teacher - teacher_norm).exp_()
            teacher_term = torch.einsum("...v,...v->...", probabilities, teacher)
        cross = teacher_term - torch.einsum("...v,...v->...", probabilities, student)
        kl = cross + (torch.logsumexp(student, dim=-1) - teacher_norm.squeeze(-1))
        total = kl[valid].sum()
    count = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    return temperature**2 * total / count


def output_size(model: nn.Module) -> int | None:
    """The logits' last dimension: the vocabulary of a language model, the class count of a classifier."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if size is not None else getattr(config, "num_labels", None)


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the model's own loss shifts labels (causal LM), as the Trainer decides it."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss and not getattr(
        config, "is_encoder_decoder", False
    )


@contextlib.contextmanager
def hooks_disabled(model: nn.Module):
    """Every module hook of `model` off (restored afterwards): the teacher's forward through a PEFT student
    must not run the student's score, gate, mask or distillation hooks."""
    saved = [(module, name, getattr(module, name)) for module in model.modules() for name in _HOOK_DICTS]
    for module, name, _ in saved:
        setattr(module, name, OrderedDict())
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode, no gradients, without hooks or hard-concrete gates."""
    from .l0_gates import HardConcreteGates

    teacher = copy.deepcopy(model)
    for name, module in list(teacher.named_modules()):
        if isinstance(module, HardConcreteGates):
            parent, _, attribute = name.rpartition(".")
            delattr(teacher.get_submodule(parent), attribute)
    for module in teacher.modules():
        for name in _HOOK_DICTS:
            setattr(module, name, OrderedDict())
    return teacher.eval().requires_grad_(False)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


class Distiller:
    """The distillation hooks on a student for one training run.

    Args:
        settings: alpha, temperature, teacher.
        model: the student, the module the Trainer calls (a `PeftModel` for LoRA students).
        autocast: the run's mixed precision (`torch.bfloat16`, `torch.float16` or `None`): the teacher runs
            under the same autocast as the student.
        restore_masked: for a PEFT student without a passed teacher, a context in which the masked base
            weights hold their original values (the callback's `TrainingMasks.unmasked`).
    """

    def __init__(
        self,
        settings: Distillation,
        model: nn.Module,
        autocast: torch.dtype | None = None,
        restore_masked: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.settings = settings
        self.model = model
        self.autocast = autocast
        self.shift = _shifts_labels(model)
        device = next(model.parameters()).device
        self._restore_masked = restore_masked
        self.shares_student = False
        if settings.teacher is not None:
            expected, got = output_size(model), output_size(settings.teacher)
            if expected is not None and got is not None and expected != got:
                raise TeacherMismatchError(
                    f"teacher has {got} output logits (vocabulary or classes), the student {expected}: pass a "
                    "teacher with the student's tokenizer (or labels), or teacher=None to distil from the unpruned "
                    "student."
                )
            self.teacher = settings.teacher.eval().requires_grad_(False).to(device)
        elif is_peft(model):
            self.teacher, self.shares_student = model, True
        else:
            self.teacher = frozen_copy(model)
        self._teacher_logits: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _active(self, module: nn.Module, kwargs: dict) -> bool:
        return module.training and torch.is_grad_enabled() and kwargs.get("labels") is not None

    @torch.no_grad()
    def teacher_logits(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The teacher's logits on the student's inputs (labels and loss arguments left out)."""
        inputs = {key: value for key, value in kwargs.items() if key not in ("labels", "num_items_in_batch")}
        device = next(self.model.parameters()).device
        with contextlib.ExitStack() as stack:
            if self.autocast is not None:
                stack.enter_context(torch.autocast(device.type, dtype=self.autocast))
            if self.shares_student:
                stack.enter_context(hooks_disabled(self.model))
                stack.enter_context(_eval_mode(self.model))
                stack.enter_context(self.model.disable_adapter())
                if self._restore_masked is not None:
                    stack.enter_context(self._restore_masked())
            output = self.teacher(*args, **inputs)
        return output["logits"] if isinstance(output, dict) else output[0]

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        self._teacher_logits = self.teacher_logits(args, kwargs) if self._active(module, kwargs) else None

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        teacher_logits, self._teacher_logits = self._teacher_logits, None
        if teacher_logits is None or not self._active(module, kwargs):
            return output
        if not isinstance(output, dict) or output.get("loss") is None:
            raise UsageError(
                "distill needs the model to return its task loss as output.loss (labels passed to the model, "
                "return_dict=True); with a Trainer label_smoother or compute_loss_func the model computes no loss."
            )
        if teacher_logits.shape[-1] != output["logits"].shape[-1]:
            raise TeacherMismatchError(
                f"teacher logits have {teacher_logits.shape[-1]} entries per item, the student's "
                f"{output['logits'].shape[-1]}: the teacher must share the student's vocabulary (or classes)."
            )
        alpha = self.settings.alpha
        kd = distillation_loss(
            output["logits"],
            teacher_logits,
            kwargs["labels"],
            self.settings.temperature,
            self.shift,
            kwargs.get("num_items_in_batch"),
        )
        output["loss"] = alpha * kd.to(output["loss"].dtype) + (1 - alpha) * output["loss"]
        return output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._teacher_logits = None
