"""LearnerConfig: every setting that shapes learning, importable without torch so that a
daemon can check its configuration before it imports torch (fast start)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AUGMENTS = ("shift", "shift+flip", "none")
STREAM_LOSSES = ("ce", "ace")
MERGE_LOGITS = ("fill", "replace", "keep")
OFFER_LOGITS = ("forward", "none")
BUFFER_POLICIES = ("reservoir", "balanced")
OPTIMIZERS = ("sgd", "adam")
HEAD_INITS = ("random", "imprint")
KEEP_FROM = ("first", "last")
# terms that read only the logits of replayed samples and the stream batch's raw inputs,
# so they work when replayed samples enter the network past its frozen layers
LATENT_TERMS = {"er", "der", "derpp", "ewcpp"}


@dataclass
class LearnerConfig:
    """Everything that shapes learning. Defaults are the tuned Split-MNIST setting."""
    method: str = "derpp+ewcpp"      # '+'-joined terms, or 'finetune' for none
    buffer_size: int = 200           # reservoir capacity, samples
    lr: float = 0.05
    momentum: float = 0.0            # SGD momentum (Adam: beta1 is its own)
    optimizer: str = "sgd"           # 'sgd' | 'adam'
    seed: int = 0
    teacher: str = "none"            # 'none' | 'online' | 'frozen:PATH'
    teacher_arch: str | None = None  # resnet20/32/56 (small inputs), resnet18/34/50; None: by size
    teacher_lr: float = 0.05
    consolidate_every: int = 1000    # steps between consolidation points without a new class
    consolidate_min_gap: int = 25    # new classes within this many steps of the last point
                                     # join it (classes of one task arrive together)
    augment: str = "shift"           # on replay draws: 'shift' | 'shift+flip' | 'none'
    terms: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-term parameters
    prequential_window: int = 1000
    min_final_map: int = 4           # student stride rule: last feature map side, pixels
    stride_relax: str = "early"      # which stride-2 layers the rule relaxes: 'early' | 'late'
    bn_momentum: float = 0.1         # student BatchNorm running-statistics momentum
    bn_refresh: bool = False         # re-estimate BatchNorm statistics from the replay
                                     # buffer before an eval-mode prediction or export
    stream_loss: str = "ce"          # 'ce' | 'ace': ER-ACE's asymmetric CE on the stream batch
    buffer_policy: str = "reservoir"  # 'reservoir' | 'balanced' (class-balanced, CBRS)
    iterations: int = 4              # optimizer steps per incoming batch (fresh replay draws)
    keep_from: str = "first"         # which of a batch's steps offers it to the buffer, with
                                     # that step's logits: 'first' | 'last' (the most learned)
    head_init: str = "random"        # a new class's head row: 'random' | 'imprint' (the mean
                                     # embedding of its first samples, weight imprinting)
    predict_in_eval: bool = False    # prequential guess from a separate eval-mode forward
    logit_adjust: float = 0.0        # tau of the logit-adjusted softmax (0: off)
    prior_decay: float = 0.99        # per step, of the running class prior it adjusts by
    merge_logits: str = "fill"       # DER's stored logits at a federation merge: 'fill'
                                     # (the merged model's, for the classes a row lacks) |
                                     # 'replace' (the merged model's, every class) | 'keep'
    offer_logits: str = "forward"    # logits stored with samples offered to the buffer
                                     # without training (offer_many): 'forward' | 'none'
    latent_layers: int = 0           # latent replay: student body layers frozen after
                                     # `latent_after` samples (0: off)
    latent_after: int = 1000         # samples learned before the layers freeze
    channels_last: bool = True
    threads: int | None = None       # torch intra-op threads; None keeps torch's choice

    def term_names(self) -> list[str]:
        if self.method in ("", "finetune"):
            return []
        return [t.strip() for t in self.method.split("+")]

    def validate(self) -> None:
        """Raise ValueError naming the bad field, before any model is built (imports the
        term and model registries, so torch)."""
        from edgecl.learn.terms import TERMS
        from edgecl.models import TEACHERS

        names = self.term_names()
        for name in names:
            if name not in TERMS:
                raise ValueError(f"method: unknown term {name!r}; known terms: "
                                 f"{', '.join(sorted(TERMS))} (or 'finetune')")
        if len(set(names)) != len(names):
            raise ValueError(f"method: term repeated in {self.method!r}")
        for name in self.terms:
            if name not in names:
                raise ValueError(f"terms: parameters given for {name!r}, which is not in "
                                 f"method {self.method!r}")
            TERMS[name].check_params(self.terms[name])
        if self.buffer_size < 0:
            raise ValueError("buffer_size must be >= 0")
        if self.lr <= 0 or self.teacher_lr <= 0:
            raise ValueError("lr and teacher_lr must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}")
        if not (self.teacher in ("none", "online") or self.teacher.startswith("frozen:")):
            raise ValueError("teacher must be 'none', 'online' or 'frozen:PATH'")
        if self.teacher_arch is not None and self.teacher_arch not in TEACHERS:
            raise ValueError(f"teacher_arch must be one of {', '.join(TEACHERS)}")
        if "kd" in names and self.teacher == "none":
            raise ValueError("method uses 'kd' but teacher is 'none': set teacher to "
                             "'online' or 'frozen:PATH'")
        for name in names:  # distillation terms that take `source`: the anchor or the teacher
            source = self.terms.get(name, {}).get("source", TERMS[name].defaults.get("source"))
            if source not in (None, "anchor", "teacher"):
                raise ValueError(f"{name}.source must be 'anchor' or 'teacher', not {source!r}")
            if source == "teacher" and self.teacher == "none":
                raise ValueError(f"{name} distills from the teacher but teacher is 'none': set "
                                 "teacher to 'online' or 'frozen:PATH', or source to 'anchor'")
        if self.stride_relax not in ("late", "early"):
            raise ValueError("stride_relax must be 'late' or 'early'")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError("bn_momentum must be in (0, 1]")
        if self.stream_loss not in STREAM_LOSSES:
            raise ValueError(f"stream_loss must be one of {', '.join(STREAM_LOSSES)}")
        if self.merge_logits not in MERGE_LOGITS:
            raise ValueError(f"merge_logits must be one of {', '.join(MERGE_LOGITS)}")
        if self.buffer_policy not in BUFFER_POLICIES:
            raise ValueError(f"buffer_policy must be one of {', '.join(BUFFER_POLICIES)}")
        if self.logit_adjust < 0 or not 0.0 <= self.prior_decay < 1.0:
            raise ValueError("logit_adjust must be >= 0 and prior_decay in [0, 1)")
        if self.keep_from not in KEEP_FROM:
            raise ValueError(f"keep_from must be one of {', '.join(KEEP_FROM)}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}")
        if self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if self.offer_logits not in OFFER_LOGITS:
            raise ValueError(f"offer_logits must be one of {', '.join(OFFER_LOGITS)}")
        self._validate_latent(names)
        if self.consolidate_min_gap < 0:
            raise ValueError("consolidate_min_gap must be >= 0")
        if self.consolidate_every < 1:
            raise ValueError("consolidate_every must be >= 1")

    def _validate_latent(self, names: list[str]) -> None:
        """Latent replay feeds replayed samples past the frozen layers: only terms that read
        logits and the stream's raw inputs, no teacher, and statistics that stay put."""
        if self.latent_layers < 0 or self.latent_after < 0:
            raise ValueError("latent_layers and latent_after must be >= 0")
        if self.latent_layers and not set(names) <= LATENT_TERMS:
            raise ValueError(f"latent_layers works with the terms {', '.join(sorted(LATENT_TERMS))}"
                             f" only (the others read features or inputs of the frozen "
                             f"layers); method is {self.method!r}")
        if self.latent_layers and (self.teacher != "none" or self.bn_refresh):
            raise ValueError("latent_layers needs teacher 'none' and bn_refresh off")
