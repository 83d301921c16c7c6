"""Loss weighting for multi-task learning: one shared trunk, one head per task, one total loss.

A strategy maps the per-task scalar losses of a batch to one total loss and a dict of floats to
log. It never calls ``backward``. Every strategy follows the same rules:

* ``losses`` may lack a task or hold ``None`` for it (the batch had no labels for that task):
  that task contributes nothing to the total. If no task has a loss the total is
  ``torch.zeros(())`` (float32, on the device of the strategy's parameters or buffers, else the
  CPU); it does not require grad, so the caller decides whether to skip the step.
* A task name that the strategy does not know raises :class:`ValueError`.
* Losses are summed in float32 (``loss.float()``), so bf16 losses under autocast give a float32 total.
* ``logged`` holds ``weight/<task>`` for every task (the multiplier of that task's loss), plus
  strategy-specific entries.

Strategies (see :func:`build_weighting`): ``equal``, ``static``, ``uncertainty`` (Kendall et al.
2018), ``dwa`` (Liu et al. 2019) and ``rlw`` (Lin et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tlmodules.errors import ConfigError

REGRESSION_KIND = "regression"
CLASSIFICATION_KINDS = ("multiclass", "binary", "multilabel", "segmentation", "mask")  # per pixel: a likelihood each
KINDS = (REGRESSION_KIND, *CLASSIFICATION_KINDS)


class LossWeighting(nn.Module):
    """Base: ``forward(losses, step) -> (total, logged)``.

    Subclasses give :meth:`weights`; the default :meth:`forward` then returns
    ``total = Σ_t w_t · L_t`` over the tasks that have a loss in this batch. A subclass whose total
    is not a weighted sum (uncertainty weighting) overrides :meth:`_combine`.

    Args:
        tasks: the task names, in order; the order is kept for buffers, parameters and logs.
            Must be non-empty strings without duplicates.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise ValueError(f"tasks must be a sequence of task names, not the single string {tasks!r}")
        tasks = list(tasks)
        if not tasks:
            raise ValueError("tasks is empty: a loss weighting needs at least one task name")
        bad = [t for t in tasks if not isinstance(t, str) or not t]
        if bad:
            raise ValueError(f"task names must be non-empty strings, got {bad!r}")
        duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names {duplicates!r} in tasks {tasks!r}")
        self.tasks: list[str] = tasks

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def weights(self, step: int = 0) -> dict[str, float]:
        """The current weight (multiplier of ``L_t``) of every task, for logging."""
        raise NotImplementedError(f"{type(self).__name__} does not define weights()")

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """Called once per finished training epoch with each task's mean loss; default: nothing."""

    def forward(self, losses: Mapping[str, Tensor | None], step: int = 0) -> tuple[Tensor, dict[str, float]]:
        """Combine the per-task losses of one batch.

        Args:
            losses: task name → scalar loss, or ``None`` / absent for a task without labels in the batch.
            step: the global optimisation step (used by strategies whose weights depend on it).

        Returns:
            ``(total, logged)``: the float32 total loss and a dict of floats to log, holding
            ``weight/<task>`` for every task.
        """
        present = self._present(losses)
        if not present:
            total = torch.zeros((), dtype=torch.float32, device=self._device())
            extra: dict[str, float] = {}
        else:
            total, extra = self._combine(present, step)
        logged = {f"weight/{task}": float(w) for task, w in self.weights(step).items()}
        logged.update(extra)
        return total, logged

    def _combine(self, present: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        """``Σ_t w_t · L_t`` over the present tasks; ``present`` holds float32 scalars, in task order."""
        weights = self.weights(step)
        terms = [loss * weights[task] for task, loss in present.items()]
        return torch.stack(terms).sum(), {}

    def _present(self, losses: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        """Validate ``losses`` and return the tasks that have a loss, in task order, as float32 scalars."""
        unknown = [name for name in losses if name not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown!r} in losses; known tasks: {self.tasks!r}")
        present: dict[str, Tensor] = {}
        for task in self.tasks:
            loss = losses.get(task)
            if loss is None:
                continue
            if not isinstance(loss, Tensor):
                loss = torch.as_tensor(loss, dtype=torch.float32)
            if loss.numel() != 1:
                raise ValueError(f"the loss of task {task!r} must be a scalar, got shape {tuple(loss.shape)}")
            present[task] = loss.reshape(()).float()
        return present

    def _device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def extra_repr(self) -> str:
        return f"tasks={self.tasks!r}"


class EqualWeighting(LossWeighting):
    """Equal weighting: ``total = Σ_t L_t`` (every weight is 1)."""

    def weights(self, step: int = 0) -> dict[str, float]:
        return {task: 1.0 for task in self.tasks}


class StaticWeighting(LossWeighting):
    """Fixed weights: ``total = Σ_t w_t · L_t``.

    Args:
        tasks: the task names.
        weights: task → non-negative finite weight; a task missing here gets 1.0. A name that is
            not a task raises :class:`ValueError`.
    """

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(tasks)
        unknown = [name for name in weights if name not in self.tasks]
        if unknown:
            raise ConfigError(f"static weights name unknown task(s) {unknown!r}; known tasks: {self.tasks!r}")
        bad = {name: w for name, w in weights.items() if not math.isfinite(float(w)) or float(w) < 0}
        if bad:
            raise ConfigError(f"static weights must be finite and non-negative, got {bad!r}")
        self.static_weights: dict[str, float] = {task: float(weights.get(task, 1.0)) for task in self.tasks}

    def weights(self, step: int = 0) -> dict[str, float]:
        return dict(self.static_weights)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks!r}, weights={self.static_weights!r}"


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018).

    One learned log-variance ``s_t = log σ_t²`` per task (initialised to 0), stored in the
    parameter vector :attr:`log_vars` (in task order) so an optimiser over ``module.parameters()``
    trains it. The total is the sum, over the tasks with a loss in the batch, of::

        regression:      0.5 · exp(−s_t) · L_t + 0.5 · s_t
        classification:        exp(−s_t) · L_t + 0.5 · s_t

    (the stable ``log σ²`` form of ``1/(2σ²)·L + log σ`` and ``1/σ²·L + log σ``). For a constant
    loss ``L`` the optimum is ``s* = log L`` (regression) and ``s* = log 2L`` (classification).
    The reported ``weight/<task>`` is the multiplier of ``L_t`` (``0.5·exp(−s_t)`` or
    ``exp(−s_t)``); ``log_var/<task>`` is ``s_t``. A task without a loss adds neither term.

    Args:
        tasks: the task names.
        kinds: task → ``"regression"`` or a classification kind (``"multiclass"``, ``"binary"``,
            ``"multilabel"``, and per pixel ``"segmentation"`` and ``"mask"``, as the paper's semantic
            segmentation); every task needs a kind.
    """

    def __init__(self, tasks: Sequence[str], kinds: Mapping[str, str]) -> None:
        super().__init__(tasks)
        unknown = [name for name in kinds if name not in self.tasks]
        if unknown:
            raise ConfigError(f"kinds name unknown task(s) {unknown!r}; known tasks: {self.tasks!r}")
        missing = [task for task in self.tasks if task not in kinds]
        if missing:
            raise ConfigError(f"kinds lacks task(s) {missing!r}; give each task one of {list(KINDS)!r}")
        bad = {task: kind for task, kind in kinds.items() if kind not in KINDS}
        if bad:
            raise ConfigError(f"unknown kind(s) {bad!r}; accepted kinds: {list(KINDS)!r}")
        self.kinds: dict[str, str] = {task: kinds[task] for task in self.tasks}
        # 0.5 for regression, 1 for classification: the multiplier of exp(−s_t) · L_t.
        self.factors: dict[str, float] = {t: 0.5 if k == REGRESSION_KIND else 1.0 for t, k in self.kinds.items()}
        self.log_vars = nn.Parameter(torch.zeros(self.num_tasks))

    def weights(self, step: int = 0) -> dict[str, float]:
        log_vars = self.log_vars.detach().float().cpu().tolist()
        return {task: self.factors[task] * math.exp(-s) for task, s in zip(self.tasks, log_vars)}

    def _combine(self, present: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, float]]:
        log_vars = self.log_vars.float()
        terms = []
        for task, loss in present.items():
            s = log_vars[self.tasks.index(task)]
            terms.append(self.factors[task] * torch.exp(-s) * loss + 0.5 * s)
        logged = {f"log_var/{task}": s for task, s in zip(self.tasks, self.log_vars.detach().float().cpu().tolist())}
        return torch.stack(terms).sum(), logged

    def extra_repr(self) -> str:
        return f"kinds={self.kinds!r}"


class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    The weights change once per epoch, in :meth:`end_epoch`, from the mean loss of each task over
    the last two finished epochs::

        r_t = L_t(k−1) / L_t(k−2)
        w_t = K · exp(r_t / T) / Σ_i exp(r_i / T)        (K tasks, temperature T)

    and ``total = Σ_t w_t · L_t``. Until two epochs have been recorded every weight is 1. A task
    missing from an epoch's means (or with a non-finite mean), or whose ``L_t(k−2)`` is zero,
    keeps ``r_t = 1``.

    The history lives in buffers — :attr:`history` ``(2, K)`` holding ``[L(k−2), L(k−1)]``
    (NaN for a missing task) and :attr:`num_epochs` — so it survives ``state_dict()`` /
    ``load_state_dict()`` when a run is resumed. In DDP, pass the same (cross-process averaged)
    means on every process.

    Args:
        tasks: the task names.
        temperature: ``T > 0``; larger T gives more even weights.
    """

    history: Tensor
    num_epochs: Tensor

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if not math.isfinite(float(temperature)) or float(temperature) <= 0:
            raise ConfigError(f"DWA temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.register_buffer("history", torch.full((2, self.num_tasks), math.nan, dtype=torch.float32))
        self.register_buffer("num_epochs", torch.zeros((), dtype=torch.long))

    def end_epoch(self, epoch_losses: Mapping[str, float]) -> None:
        """Record the finished epoch's mean loss per task; the new weights apply from now on."""
        unknown = [name for name in epoch_losses if name not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown!r} in epoch_losses; known tasks: {self.tasks!r}")
        means = [math.nan if epoch_losses.get(task) is None else float(epoch_losses[task]) for task in self.tasks]
        with torch.no_grad():
            self.history[0].copy_(self.history[1])
            self.history[1].copy_(torch.tensor(means, dtype=self.history.dtype))
            self.num_epochs.add_(1)

    def ratios(self) -> dict[str, float]:
        """``r_t = L_t(k−1) / L_t(k−2)``, 1 where undefined (fewer than two epochs, a missing task, a zero)."""
        if int(self.num_epochs) < 2:
            return {task: 1.0 for task in self.tasks}
        older, last = self.history.detach().float().cpu().tolist()
        ratios = {}
        for task, prev, cur in zip(self.tasks, older, last):
            ok = math.isfinite(prev) and math.isfinite(cur) and prev != 0
            ratios[task] = cur / prev if ok else 1.0
        return ratios

    def weights(self, step: int = 0) -> dict[str, float]:
        if int(self.num_epochs) < 2:
            return {task: 1.0 for task in self.tasks}
        scaled = {task: r / self.temperature for task, r in self.ratios().items()}
        top = max(scaled.values())
        exps = {task: math.exp(v - top) for task, v in scaled.items()}
        norm = sum(exps.values())
        return {task: self.num_tasks * e / norm for task, e in exps.items()}

    def extra_repr(self) -> str:
        return f"tasks={self.tasks!r}, temperature={self.temperature}"


class RandomLossWeighting(LossWeighting):
    """Random Loss Weighting, RLW (Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022).

    Each step draws ``z ~ N(0, I_K)`` and uses ``w = softmax(z)`` (positive, summing to 1);
    ``total = Σ_t w_t · L_t``. The draw is a pure function of ``(seed, step)`` — a CPU
    ``torch.Generator`` seeded with ``seed · 1_000_003 + step`` — so every DDP process draws the
    same weights, a resumed run repeats them, and :meth:`weights` returns exactly the weights
    :meth:`forward` used at that step.

    Args:
        tasks: the task names.
        seed: the base seed.
    """

    def __init__(self, tasks: Sequence[str], seed: int = 0) -> None:
        super().__init__(tasks)
        self.seed = int(seed)

    def weights(self, step: int = 0) -> dict[str, float]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        z = torch.randn(self.num_tasks, generator=generator, dtype=torch.float32)
        return dict(zip(self.tasks, torch.softmax(z, dim=0).tolist()))

    def extra_repr(self) -> str:
        return f"tasks={self.tasks!r}, seed={self.seed}"


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "equal": EqualWeighting,
    "static": StaticWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "rlw": RandomLossWeighting,
}


def build_weighting(name: str, tasks: Sequence[str], **kwargs: Any) -> LossWeighting:
    """Build a loss weighting by name: ``equal``, ``static`` (``weights=``), ``uncertainty``
    (``kinds=``), ``dwa`` (``temperature=``) or ``rlw`` (``seed=``)."""
    if name not in WEIGHTINGS:
        raise ConfigError(f"unknown loss weighting {name!r}; accepted names: {list(WEIGHTINGS)!r}")
    return WEIGHTINGS[name](tasks, **kwargs)
