"""What a loss term is, and the step it sees.

A term is one class in one file. The learner builds one `Step` per incoming mini-batch:
terms first ask for replay draws (`prepare`), the learner runs ONE forward pass over the
stream batch and every draw together, then each term turns its slice of the logits into a
loss. Optional hooks: `after_backward` (gradients are present), `consolidate` (a
consolidation point: a new class arrived, or `consolidate_every` steps passed), `on_grow`
(the head gained classes), `state_dict` / `load_state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Part:
    """A contiguous slice of the step batch, with what the buffer stored for it."""
    rows: slice
    stored_logits: torch.Tensor | None = None  # (n, K_stored) for DER draws
    stored_width: torch.Tensor | None = None   # (n,) classes that existed at storage time
    latent: torch.Tensor | None = None  # latent replay: the rows' output of the frozen layers


@dataclass
class Step:
    """One learning step: inputs of the stream batch plus replay draws, then their outputs."""
    x_parts: list[torch.Tensor] = field(default_factory=list)
    y_parts: list[torch.Tensor] = field(default_factory=list)
    parts: dict[str, Part] = field(default_factory=dict)
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    # named taps (edgecl.models.EdgeNet), filled only with the names some term declared
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # student, with grad
    teacher_logits: torch.Tensor | None = None
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)  # detached
    anchor_logits: torch.Tensor | None = None  # (n, K_anchor): K_anchor <= num_classes
    anchor_features: dict[str, torch.Tensor] = field(default_factory=dict)  # no grad
    num_classes: int = 0
    index: int = 0  # global step counter
    repeat: int = 0  # which of its batch's `iterations` steps this is (0: the first)
    # tau * log(prior of each class in what the learner trains on): added to the logits of
    # every cross-entropy (logit-adjusted softmax), None when the learner does not adjust
    label_shift: torch.Tensor | None = None

    def add(self, name: str, x: torch.Tensor, y: torch.Tensor, **stored) -> None:
        start = sum(len(p) for p in self.x_parts)
        self.x_parts.append(x)
        self.y_parts.append(y)
        self.parts[name] = Part(slice(start, start + len(x)), **stored)

    def seal(self) -> None:
        self.x = torch.cat(self.x_parts)
        self.y = torch.cat(self.y_parts)

    def has(self, name: str) -> bool:
        return name in self.parts

    def logits_of(self, name: str) -> torch.Tensor:
        return self.logits[self.parts[name].rows]

    def class_logits_of(self, name: str) -> torch.Tensor:
        """The logits a cross-entropy on part `name` should use: with logit adjustment on,
        shifted by tau * log(training prior), so a class trained on more often (the new one)
        does not win by frequency alone; otherwise the logits themselves."""
        logits = self.logits_of(name)
        return logits if self.label_shift is None else logits + self.label_shift

    def labels_of(self, name: str) -> torch.Tensor:
        return self.y[self.parts[name].rows]

    def rows_of(self, name: str, batch: torch.Tensor) -> torch.Tensor:
        """The rows of part `name` in any step-batch tensor (features, anchor outputs)."""
        return batch[self.parts[name].rows]


class Term:
    """Base class: a weighted loss term. Subclasses set `name` and `describe`."""

    name = "term"
    describe = ""
    defaults: dict = {}
    # What the learner must compute for this term; it takes the union over terms once per
    # step, and nothing at all when no term asks (instances may set these in __init__).
    taps: tuple[str, ...] = ()          # student taps -> step.features (and anchor's, below)
    needs_anchor: bool = False          # step.anchor_logits, step.anchor_features[taps]
    teacher_taps: tuple[str, ...] = ()  # teacher taps -> step.teacher_features
    memory_note = "nothing beyond the model and buffer"  # what memory_bytes counts, in words

    def __init__(self, learner, **params):
        self.learner = learner
        for key, value in {**self.defaults, **self.check_params(params)}.items():
            setattr(self, key, value)

    @classmethod
    def check_params(cls, params: dict) -> dict:
        """Raise ValueError naming an unknown parameter, or one whose type does not match its
        default (an int is accepted for a float; a None default accepts anything), so a
        config typo fails before learning."""
        if not isinstance(params, dict):
            raise ValueError(f"{cls.name}: parameters must be a table of name = value, "
                             f"got {params!r}")
        unknown = set(params) - set(cls.defaults)
        if unknown:
            raise ValueError(f"{cls.name}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(cls.defaults)) or 'none'}")
        for key, value in params.items():
            default = cls.defaults[key]
            if default is None:
                continue
            kind = float if isinstance(default, float) else type(default)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  if kind is float else type(value) is kind)
            if not ok:
                raise ValueError(f"{cls.name}.{key}: expected {kind.__name__} like the default "
                                 f"{default!r}, got {value!r}")
        return params

    @classmethod
    def memory_bytes(cls, student: torch.nn.Module, input_shape: tuple[int, int, int],
                     params: dict) -> int:
        """Bytes this term adds to a learner training `student` on inputs of `input_shape`
        (C, H, W), with `params` its parameters (defaults merged with the user's). A static
        figure for `edgecl methods`, before any data is seen; `extra_bytes()` is the live one.

        Count what choosing this term makes the learner hold beyond the student, its optimizer
        and the replay buffer: float32 vectors of the student's size (importance, anchor θ*:
        `4 * n_params` bytes each, n_params = sum(p.numel() for p in student.parameters())),
        a frozen anchor copy of the student (its parameters and buffers), regressors or
        projections the term trains, sample windows it keeps (`n * C*H*W` bytes as uint8).
        Count structures shared with other terms (one anchor model for LwF and PODNet) in
        full for each term: it is what the term costs when chosen on its own. Leave out
        transient memory of one step (activations, per-sample gradients). Say in
        `memory_note` what the figure is made of.
        """
        return 0

    def prepare(self, step: Step, rng: np.random.Generator) -> None:
        """Add replay draws to the step before the forward pass."""

    def loss(self, step: Step) -> torch.Tensor | None:
        return None

    def after_backward(self, step: Step) -> None:
        pass

    def consolidate(self) -> None:
        pass

    def on_grow(self, old_n: int, new_n: int) -> None:
        pass

    def extra_bytes(self) -> int:
        """Memory this term holds beyond the model and buffer (importance, anchors...)."""
        return 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
