"""What the parameter-importance terms share.

Every one of them adds the same penalty, `sum_i (lam/2) * Omega_i * (theta_i - theta*_i)^2`,
and differs only in how the importance Omega is estimated (docs/learning.md, "Methods:
parameter importance"). `ImportancePenalty` is that penalty, with the head-growth padding, the
state dict and the memory figures; `RecentWindow` keeps the last stream samples for terms that
estimate Omega on recent data at a consolidation point; `PathIntegral` is SI's running
`omega += -g * delta_theta`; `per_sample_mean` averages a function of one gradient per sample.
"""
from __future__ import annotations

from math import prod
from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

from edgecl.learn.terms.base import Step, Term

FLOAT_BYTES = 4  # every per-parameter vector is float32, like the student


def per_sample_mean(model: torch.nn.Module,
                    sample_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor,
                    transform: Callable[[torch.Tensor], torch.Tensor],
                    chunk: int = 50) -> dict[str, torch.Tensor]:
    """`mean_i transform(d sample_fn(model(x_i), y_i) / d theta)`, one gradient per sample.

    In eval mode, as the model predicts: dropout off and BatchNorm on its running statistics,
    so one sample's gradient does not depend on the others in its batch. Chunks of `chunk`
    samples bound the memory of the per-sample gradients (chunk x n_params floats).
    """
    was_training = model.training
    model.eval()
    try:
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def one(p, xi, yi):
            return sample_fn(functional_call(model, (p, buffers), (xi.unsqueeze(0),))[0], yi)

        per_sample = vmap(grad(one), in_dims=(None, 0, 0))
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        for start in range(0, len(x), chunk):
            grads = per_sample(params, x[start:start + chunk], y[start:start + chunk])
            for k, g in grads.items():
                total[k] += transform(g).sum(dim=0)
        return {k: v / len(x) for k, v in total.items()}
    finally:
        model.train(was_training)


def pad_rows(store: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
             fill: str) -> None:
    """After the head grew: widen each stored vector to its parameter's new shape, the new
    rows zero (`fill="zero"`: no importance, no path yet) or the parameter's current value
    (`fill="param"`: an anchor for a new class is where it starts)."""
    for name, value in list(store.items()):
        current = params[name]
        if value.shape != current.shape:
            new = torch.zeros_like(current) if fill == "zero" else current.detach().clone()
            new[: value.shape[0]] = value
            store[name] = new


def nbytes(store: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in store.values())


class RecentWindow:
    """The last `size` stream samples and their labels, for importance estimated at a
    consolidation point on the data just learned (the paper's "the task's training data").

    A stream of uint8 inputs is kept as uint8 (the learner feeds them as raw / 255, which
    round-trips exactly): 4x less memory than the float tensors.
    """

    def __init__(self, size: int):
        self.size = size
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.raw_uint8 = False

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    def add(self, x: torch.Tensor, y: torch.Tensor, raw_uint8: bool) -> None:
        self.raw_uint8 = raw_uint8
        x = x.detach()
        x = (x * 255.0).round().to(torch.uint8) if raw_uint8 else x.clone()
        x = x.contiguous()
        if self.x is not None and self.x.dtype == x.dtype:
            x, y = torch.cat([self.x, x]), torch.cat([self.y, y])
        self.x, self.y = x[-self.size:], y[-self.size:].clone()

    def inputs(self) -> torch.Tensor:
        return self.x.float().div_(255.0) if self.x.dtype == torch.uint8 else self.x

    def clear(self) -> None:
        self.x = self.y = None

    def nbytes(self) -> int:
        return 0 if self.x is None else self.x.numel() * self.x.element_size() + \
            self.y.numel() * self.y.element_size()

    @staticmethod
    def bytes_for(size: int, input_shape: tuple[int, int, int]) -> int:
        """Full window of uint8 inputs with int64 labels (a float stream: 4x the inputs)."""
        return size * (prod(input_shape) + 8)

    def state_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "raw_uint8": self.raw_uint8}

    def load_state_dict(self, state: dict) -> None:
        self.x, self.y, self.raw_uint8 = state["x"], state["y"], state["raw_uint8"]


class PathIntegral:
    """SI's path integral `omega_k += -g_k(t) * (theta_k(t+1) - theta_k(t))`, one update behind.

    `record` is called once per learning step with the parameters before the optimizer moves
    them and the task gradient g(t); the step's movement is only known at the next call (or
    at `flush`, at a consolidation point), so it keeps theta(t) and g(t) until then. Using
    the actual movement, not `-lr * g`, keeps it right under momentum.
    """

    def __init__(self):
        self.omega: dict[str, torch.Tensor] = {}
        self.prev_param: dict[str, torch.Tensor] = {}
        self.prev_grad: dict[str, torch.Tensor] = {}

    def record(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.flush(params)
        self.prev_param = {k: p.detach().clone() for k, p in params.items()}
        self.prev_grad = {k: g.detach().clone() for k, g in grads.items()}

    def flush(self, params: dict[str, torch.Tensor]) -> None:
        """Add the movement since the last `record` and forget it."""
        for name, g in self.prev_grad.items():
            moved = params[name].detach() - self.prev_param[name]
            self.omega[name] = self.omega.get(name, torch.zeros_like(g)) - g * moved
        self.prev_param, self.prev_grad = {}, {}

    def take(self) -> dict[str, torch.Tensor]:
        """The accumulated omega, reset to zero for the next interval."""
        omega, self.omega = self.omega, {}
        return omega

    def pad(self, params: dict[str, torch.Tensor]) -> None:
        pad_rows(self.omega, params, "zero")
        pad_rows(self.prev_grad, params, "zero")
        pad_rows(self.prev_param, params, "param")

    def nbytes(self) -> int:
        return nbytes(self.omega) + nbytes(self.prev_param) + nbytes(self.prev_grad)

    def state_dict(self) -> dict:
        return {"omega": dict(self.omega), "prev_param": dict(self.prev_param),
                "prev_grad": dict(self.prev_grad)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("omega", "prev_param", "prev_grad"):
            setattr(self, key, {k: v.clone() for k, v in state[key].items()})


def task_gradients(term: "ImportancePenalty", params: dict[str, torch.Tensor],
                   step: Step) -> dict[str, torch.Tensor]:
    """The gradient without this term's own penalty: `p.grad - stiffness * (p - anchor)`, the
    penalty's exact analytic gradient (its stiffness is constant within a step), so SI's
    omega sees the data's pull and not the brake it applies itself. The learner's single
    backward needs no second pass for it. Gradients of other terms in the method (replay,
    other regularizers) stay in: they are part of what the model is trained on."""
    penalized = term.penalized_step == step.index
    omega = term.omega() if penalized else {}
    grads = {}
    for name, p in params.items():
        g = torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        if penalized and name in omega:
            g -= term.stiffness(omega[name]) * (p.detach() - term.anchor[name])
        grads[name] = g
    return grads


class FollowsPath:
    """For importance terms that credit the training path (SI, RWalk): keeps a
    `PathIntegral` in `self.path`, recorded once per step from `task_gradients`, with
    theta* starting at the student's first step; pads, counts and saves it with the rest.
    List it before the `ImportancePenalty` base: `class SI(FollowsPath, ImportancePenalty)`.
    """

    components = ("path",)

    def __init__(self, learner, **params):
        super().__init__(learner, **params)
        self.path = PathIntegral()

    def record_path(self, step: Step) -> None:
        params = self._params()
        if not self.anchor:
            self.set_anchor()  # where the first path starts
        self.path.record(params, task_gradients(self, params, step))


class ImportancePenalty(Term):
    """`(1/2) * sum_i min(lam * Omega_i, 1/lr) * (theta_i - theta*_i)^2`: the textbook
    `sum_i (lam/2) * Omega_i * (theta_i - theta*_i)^2` with the stiffness lam*Omega capped.

    The cap 1/lr on the stiffness lam*Omega keeps one SGD step on the penalty from
    overshooting its anchor (lr * stiffness <= 1); past it the quadratic pull oscillates and
    diverges (EWC++ on MNIST's stem layers went to NaN without it). Where the cap does not
    bind (and Omega >= 0, see `stiffness`) this is exactly the textbook penalty.

    Subclasses name their per-parameter stores: `zero_padded` (importance, running sums: new
    head rows start at 0) and `param_padded` (anchors: new rows start at their init value),
    set `importance_store` (the store that is Omega) or override `omega()`, name helper
    objects with `nbytes`, `state_dict`, `load_state_dict` (and `pad`) in `components`, and set
    `vectors` (float32 vectors of the student's size they hold) and `window` (True if they
    keep a `RecentWindow` of `samples` inputs) for `memory_bytes`.
    """

    importance_store = "importance"
    zero_padded: tuple[str, ...] = ("importance",)
    param_padded: tuple[str, ...] = ("anchor",)
    components: tuple[str, ...] = ()  # helper objects (window, path) saved and counted too
    vectors = 2
    window = False

    def __init__(self, learner, **params):
        super().__init__(learner, **params)
        for store in self.zero_padded + self.param_padded:
            setattr(self, store, {})
        self.penalized_step: int | None = None  # step index whose loss included the penalty

    # ----------------------------------------------------------------- penalty
    def _params(self) -> dict[str, torch.Tensor]:
        return dict(self.learner.student.named_parameters())

    def omega(self) -> dict[str, torch.Tensor]:
        """Per-parameter importance Omega (before lam)."""
        return getattr(self, self.importance_store)

    @property
    def max_stiffness(self) -> float:
        return 1.0 / self.learner.config.lr

    def stiffness(self, omega: torch.Tensor) -> torch.Tensor:
        """lam * Omega within [0, 1/lr]: a negative Omega (SI's path credit can be, from
        noise) would turn the pull toward theta* into a push away from it."""
        return (self.lam * omega).clamp(min=0.0, max=self.max_stiffness)

    def penalty(self) -> torch.Tensor | None:
        """The penalty's value at today's parameters (with autograd), or None before the
        first anchor."""
        omega = self.omega()
        if not self.anchor or not omega:
            return None
        total = 0.0
        for name, p in self._params().items():
            w = omega.get(name)
            if w is None:
                continue
            total = total + (self.stiffness(w) * (p - self.anchor[name]).pow(2)).sum()
        return 0.5 * total

    def loss(self, step: Step):
        value = self.penalty()
        if value is not None:
            self.penalized_step = step.index
        return value

    def add_penalty_gradient(self) -> None:
        """Add the penalty's exact gradient, `stiffness * (theta - theta*)`, to each
        parameter's .grad in a few fused kernels: the same update as putting `penalty()` in
        the loss, without a forward and backward graph of small ops over every parameter
        tensor."""
        omega = self.omega()
        if not self.anchor or not omega:
            return
        named = [(n, p) for n, p in self._params().items() if n in omega and p.grad is not None]
        if not named:
            return
        stiff = torch._foreach_mul([omega[n] for n, _ in named], float(self.lam))
        torch._foreach_clamp_min_(stiff, 0.0)  # as `stiffness`: within [0, 1/lr]
        torch._foreach_clamp_max_(stiff, self.max_stiffness)
        diff = torch._foreach_sub([p.detach() for _, p in named],
                                  [self.anchor[n] for n, _ in named])
        torch._foreach_mul_(diff, stiff)
        torch._foreach_add_([p.grad for _, p in named], diff)

    def set_anchor(self) -> None:
        self.anchor = {k: v.detach().clone() for k, v in self._params().items()}

    # ------------------------------------------------------------ bookkeeping
    def _stores(self) -> tuple[str, ...]:
        return self.zero_padded + self.param_padded

    def on_grow(self, old_n: int, new_n: int) -> None:
        params = self._params()
        for store in self.zero_padded:
            pad_rows(getattr(self, store), params, "zero")
        for store in self.param_padded:
            pad_rows(getattr(self, store), params, "param")
        for part in self.components:
            if hasattr(getattr(self, part), "pad"):
                getattr(self, part).pad(params)

    def extra_bytes(self) -> int:
        return sum(nbytes(getattr(self, store)) for store in self._stores()) + \
            sum(getattr(self, part).nbytes() for part in self.components)

    def state_dict(self) -> dict:
        return {**{store: dict(getattr(self, store)) for store in self._stores()},
                **{part: getattr(self, part).state_dict() for part in self.components}}

    def load_state_dict(self, state: dict) -> None:
        for store in self._stores():
            setattr(self, store, {k: v.clone() for k, v in state[store].items()})
        for part in self.components:
            getattr(self, part).load_state_dict(state[part])

    @classmethod
    def memory_bytes(cls, student, input_shape, params) -> int:
        n_params = sum(p.numel() for p in student.parameters())
        total = cls.vectors * FLOAT_BYTES * n_params
        if cls.window:
            total += RecentWindow.bytes_for(params["samples"], input_shape)
        return total


class WindowedImportance(ImportancePenalty):
    """Importance estimated at each consolidation point on the last `samples` stream samples.

    The paper versions (EWC, MAS, SCP) estimate Omega on a task's training data when the task
    ends. edgecl's consolidation point comes when a never-seen label arrives (before it is
    learned) or every `consolidate_every` steps, so "the task's data" is a `RecentWindow` of
    the stream, cleared at each point so that every sample counts in one estimate only. The
    replay buffer is not used: these methods must work without one. Subclasses give
    `estimate(x, y)` (Omega on the window, at today's parameters) and `merge(old, new)` (how
    it joins the Omega of earlier points); theta* becomes the parameters of the point.
    """

    window = True
    components = ("recent",)

    def __init__(self, learner, **params):
        super().__init__(learner, **params)
        self.recent = RecentWindow(self.samples)

    def estimate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merge(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, step: Step) -> None:
        rows = step.parts["stream"].rows
        self.recent.add(step.x[rows], step.y[rows],
                        getattr(self.learner, "input_dtype", None) == "uint8")

    def consolidate(self) -> None:
        if len(self.recent):
            store = self.omega()
            for name, new in self.estimate(self.recent.inputs(), self.recent.y).items():
                old = store.get(name)
                store[name] = new if old is None else self.merge(old, new)
            self.recent.clear()
        self.set_anchor()
