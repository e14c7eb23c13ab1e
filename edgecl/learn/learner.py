"""OnlineLearner: predict each incoming mini-batch, then learn it, with replay and regularizers.

Usable from a notebook with no daemon:

    learner = OnlineLearner(LearnerConfig(method="derpp+ewcpp", buffer_size=200))
    for x, y in stream:                 # x: (N, C, H, W) uint8, y: ints or strings
        learner.learn_many(x, y)
    learner.predict_many(x_test)
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgecl.data import as_sample_array
from edgecl.learn import merge
from edgecl.learn.buffer import ReservoirBuffer
from edgecl.learn.latent import LatentReplay
from edgecl.learn.metrics import PrequentialAccuracy
from edgecl.learn.settings import LearnerConfig
from edgecl.learn.terms import TERMS, Step, Term
from edgecl.models import EdgeNet, build_student, build_teacher, frozen_copy, model_bytes



class OnlineLearner:
    """Task-free online continual learner. Not thread-safe: one thread owns it."""

    def __init__(self, config: LearnerConfig | None = None, **overrides):
        config = config or LearnerConfig()
        if overrides:
            config = LearnerConfig(**{**asdict(config), **overrides})
        config.validate()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.labels: list[Any] = []
        self.index: dict[Any, int] = {}
        self.input_shape: tuple[int, int, int] | None = None
        self.input_dtype: str | None = None
        self.student: EdgeNet | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.teacher: EdgeNet | None = None
        self.teacher_labels: list[Any] | None = None
        self.teacher_optimizer: torch.optim.Optimizer | None = None
        self.buffer = ReservoirBuffer(config.buffer_size, self.rng,
                                      balanced=config.buffer_policy == "balanced")
        self.latent = LatentReplay(config.latent_layers, config.latent_after)
        self.terms: list[Term] = [TERMS[name](self, **config.terms.get(name, {}))
                                  for name in config.term_names()]
        # what the terms read beyond logits, gathered once: the default path asks for nothing
        self.student_taps = _union(t.taps for t in self.terms)
        self.anchor_taps = _union(t.taps for t in self.terms if t.needs_anchor)
        self.teacher_taps = _union(t.teacher_taps for t in self.terms)
        self.needs_anchor = any(t.needs_anchor for t in self.terms)
        self.anchor: EdgeNet | None = None  # frozen student of the last consolidation point
        self.prequential = PrequentialAccuracy(config.prequential_window)
        self.steps = 0
        self.samples_learned = 0
        self.samples_offered = 0  # offered to the buffer without training (offer_many)
        self.skipped_steps = 0
        self.class_counts: list[int] = []  # samples learned per class, head order
        self.merges = 0            # global models merged in (edgecl/learn/merge.py)
        self.samples_at_merge = 0  # samples_learned when the last merge was applied
        self.last_loss = float("nan")
        self._step_seconds = 0.0
        self._steps_timed = 0
        self.last_consolidation = 0  # step of the last consolidation point
        self._statistics_at = -1  # step at which BatchNorm statistics were last re-estimated
        self.label_prior = torch.zeros(0)  # running share of each class in trained batches
        if config.teacher.startswith("frozen:"):
            self._load_frozen_teacher(config.teacher[len("frozen:"):])

    # ----------------------------------------------------------------- public API
    def learn_many(self, x, y: Sequence) -> dict:
        """Predict the batch (prequential), then learn it: `iterations` optimizer steps, each
        with fresh replay draws. The prediction is the first step's own forward pass on the
        batch (before any update), so it costs no second forward."""
        raw = self._check_inputs(x)
        if len(raw) == 0:
            raise ValueError("empty batch: nothing to learn")
        if len(y) != len(raw):
            raise ValueError(f"got {len(raw)} inputs but {len(y)} labels")
        started = time.perf_counter()
        known = len(self.labels)
        targets = self._encode_labels(y)
        xt = self._to_tensor(raw)
        if self.config.head_init == "imprint" and len(self.labels) > known:
            self.latent.train(self.student)  # embed as the training forward will
            imprint_rows(self.student, xt, targets, range(known, len(self.labels)))
        early = self._predict_indices(xt) if self.config.predict_in_eval else None
        if self.latent.due(self.samples_learned):
            self.latent.freeze(self.student, self.buffer, self._to_tensor)
        zt = self.latent.prefix(self.student, xt) if self.latent.frozen else None
        skipped = self.skipped_steps
        last = self.config.iterations - 1
        keep_at = last if self.config.keep_from == "last" else 0
        loss, predicted = self._learn_step(raw, xt, targets, keep=keep_at == 0, zt=zt)
        for i in range(1, last + 1):
            if self.skipped_steps > skipped:
                break  # a batch whose step was refused is not tried again (nor kept)
            self._learn_step(raw, xt, targets, keep=keep_at == i, zt=zt, repeat=i)
        correct = self.prequential.update(targets, predicted if early is None else early)
        self.samples_learned += len(raw)
        self._count_classes(targets)
        self._step_seconds += time.perf_counter() - started
        self._steps_timed += 1
        return {"n": len(raw), "correct": correct, "loss": loss}

    def _count_classes(self, targets: np.ndarray) -> None:
        """Per-class learned counts, head order: what an aggregator weighs each class by."""
        counts = np.bincount(targets, minlength=len(self.labels))
        self.class_counts = [a + int(b) for a, b in
                             zip(self.class_counts + [0] * (len(counts) - len(self.class_counts)),
                                 counts)]

    @property
    def learned_since_merge(self) -> int:
        return self.samples_learned - self.samples_at_merge

    def model_arrays(self) -> list:
        """The student's floating arrays as numpy copies, state_dict order (merge.py)."""
        return merge.student_arrays(self)

    def merge_global(self, labels: Sequence, arrays: dict, bn: str = "global") -> dict:
        """Merge a global model into this learner (merge.py): labels aligned by name."""
        return merge.merge_into(self, list(labels), arrays, bn, refresh=refresh_batchnorm)

    def class_statistics(self, arrays: dict, bn: str = "global",
                         rank: int = merge.STATS_RANK) -> dict:
        """Per-class embedding statistics of the buffer under a candidate global backbone
        (merge.py), for a server calibrating the global head; this learner is unchanged."""
        return merge.class_statistics(self, arrays, bn, refresh=refresh_batchnorm, rank=rank)

    def offer_many(self, x, y: Sequence) -> int:
        """Offer samples to the replay buffer without a gradient step: what a learner that
        cannot keep up with its stream does with the samples it has no time to train on,
        so the buffer stays a sample of the whole stream. New labels grow the head, as in
        learn_many. Returns how many the reservoir admitted.

        Stored logits (`offer_logits`): 'forward' runs the current student in eval mode on
        the admitted samples only (a few once the reservoir is full), as DER stores the
        logits of a trained sample; 'none' stores none, so DER's logit term skips them and
        they replay through the label term alone."""
        raw = self._check_inputs(x)
        if len(y) != len(raw):
            raise ValueError(f"got {len(raw)} inputs but {len(y)} labels")
        targets = self._encode_labels(y)
        slots = self.buffer.admit(targets)
        keep = slots >= 0
        if keep.any():
            kept = raw[keep]
            if self.config.offer_logits == "forward":
                logits = self._eval_logits(self._to_tensor(kept)).numpy()
            else:
                logits = np.zeros((len(kept), 0), dtype=np.float32)
            self.buffer.store(slots[keep], kept, targets[keep], logits)
            if self.latent.frozen:
                self.latent.store(self.buffer.capacity, slots[keep],
                                  self.latent.prefix(self.student, self._to_tensor(kept)))
        self.samples_offered += len(raw)
        return int(keep.sum())

    def predict_many(self, x) -> list:
        raw = self._check_inputs(x)
        if self.student is None or not self.labels:
            raise RuntimeError("the learner has not learned anything yet")
        return [self.labels[i] for i in self._predict_indices(self._to_tensor(raw))]

    def learn_one(self, x, y) -> dict:
        return self.learn_many(np.asarray(x)[None], [y])

    def predict_one(self, x):
        return self.predict_many(np.asarray(x)[None])[0]

    def stats(self) -> dict:
        """Plain-Python figures for status displays and benchmarks."""
        per_class = {self.labels[k]: (c / t if t else 0.0)
                     for k, (c, t) in sorted(self.prequential.per_class.items())}
        step_time = self._step_seconds / self._steps_timed if self._steps_timed else 0.0
        return {
            "samples_learned": self.samples_learned,
            "samples_offered": self.samples_offered,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "classes": list(self.labels),
            "prequential_acc": self.prequential.overall,
            "prequential_acc_window": self.prequential.recent_acc,
            "per_class_acc": per_class,
            "buffer_fill": len(self.buffer),
            "buffer_capacity": self.buffer.capacity,
            "buffer_bytes": self.buffer.nbytes() + self.latent.nbytes(),
            "terms_bytes": sum(t.extra_bytes() for t in self.terms) + self.anchor_bytes(),
            "anchor_bytes": self.anchor_bytes(),
            "steps_per_s": 1.0 / step_time if step_time else 0.0,
            "last_loss": self.last_loss,
        }

    # ------------------------------------------------------------ input handling
    def _check_inputs(self, x) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = as_sample_array(x)
        if self.input_shape is None:
            if min(x.shape[1:]) < 1:
                raise ValueError(f"empty input shape {x.shape[1:]}")
            self.input_shape = tuple(int(s) for s in x.shape[1:])
            self.input_dtype = str(x.dtype)
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input shape {tuple(x.shape[1:])} does not match the learner's "
                             f"{self.input_shape}")
        elif str(x.dtype) != self.input_dtype:
            raise ValueError(f"input dtype {x.dtype} does not match the learner's {self.input_dtype}")
        return x

    def _to_tensor(self, raw: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(raw))
        t = t.float().div_(255.0) if raw.dtype == np.uint8 else t.float()
        if self.config.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _encode_labels(self, y: Sequence) -> np.ndarray:
        """Map labels to head indices, growing the head for labels never seen before."""
        out = np.empty(len(y), dtype=np.int64)
        fresh = []
        for i, label in enumerate(y):
            if isinstance(label, np.generic):
                label = label.item()
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise ValueError(f"label {label!r} is not an int or a str")
            if label not in self.index:
                fresh.append(label)
                self.index[label] = len(self.labels)
                self.labels.append(label)
            out[i] = self.index[label]
        if fresh:
            self._grow(len(self.labels) - len(fresh), len(self.labels))
        return out

    # ------------------------------------------------------------------ models
    def anchor_bytes(self) -> int:
        """Memory of the anchor model (shared by every term that reads it)."""
        return 0 if self.anchor is None else model_bytes(self.anchor)

    def _consolidate(self) -> None:
        if self.needs_anchor:  # taken before the head grows: it knows the old classes only
            self.anchor = frozen_copy(self.student)
        for term in self.terms:
            term.consolidate()
        self.last_consolidation = self.steps

    def _grow(self, old_n: int, new_n: int) -> None:
        """A new class is a consolidation point (unless one was just taken: the first
        classes of a stream, or of a task, arrive within a few steps of each other and
        anchoring at a barely-trained model would pull learning back toward init);
        consolidate, then widen every head."""
        if self.student is None:
            torch.manual_seed(self.config.seed)  # models are built lazily: seed them here
            c, h, w = self.input_shape
            self.student = self._prepare(build_student(
                new_n, c, max(h, w), min_final_map=self.config.min_final_map,
                relax=self.config.stride_relax, bn_momentum=self.config.bn_momentum))
            self.latent.check(self.student)
            self.optimizer = make_optimizer(self.student.parameters(), self.config)
            if self.config.teacher == "online":
                self.teacher = self._prepare(build_teacher(new_n, c, max(h, w),
                                                           self.config.teacher_arch))
                self.teacher_optimizer = torch.optim.SGD(
                    self.teacher.parameters(), lr=self.config.teacher_lr,
                    momentum=self.config.momentum)
            return
        if self.steps - self.last_consolidation >= self.config.consolidate_min_gap:
            self._consolidate()
        _grow_head(self.student, self.optimizer, new_n)
        if self.config.teacher == "online":
            _grow_head(self.teacher, self.teacher_optimizer, new_n)
        for term in self.terms:
            term.on_grow(old_n, new_n)

    def _prepare(self, model: EdgeNet) -> EdgeNet:
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _predict_indices(self, xt: torch.Tensor) -> np.ndarray:
        return self._eval_logits(xt).argmax(dim=1).numpy()

    def eval_model(self) -> EdgeNet:
        """The student as it predicts and is exported: in eval mode, with its BatchNorm
        statistics re-estimated from the buffer first when `bn_refresh` is on and it has
        learned since the last estimate."""
        if self.config.bn_refresh and self._statistics_at != self.steps and len(self.buffer):
            refresh_batchnorm(self.student, self._to_tensor(self.buffer.x[:len(self.buffer)]))
            self._statistics_at = self.steps
        return self.student.eval()

    @torch.inference_mode()
    def _eval_logits(self, xt: torch.Tensor) -> torch.Tensor:
        return self.eval_model()(xt)

    # ------------------------------------------------------------------ learning
    def draw_replay(self, step: Step, name: str, n: int) -> None:
        """Add an augmented reservoir draw of up to n samples to the step (terms call this)."""
        if len(self.buffer) == 0 or n <= 0:
            return
        idx = self.buffer.sample_indices(n)
        x, y, logits, width = self.buffer.get(idx)
        k = int(width.max())
        stored = dict(stored_logits=torch.from_numpy(logits[:, :k]),
                      stored_width=torch.from_numpy(width))
        if self.latent.frozen:  # shifted in latent space: the frozen layers keep full size
            step.add(name, self._to_tensor(x), torch.from_numpy(y),
                     latent=self._augment(self.latent.get(idx)), **stored)
        else:
            step.add(name, self._augment(self._to_tensor(x)), torch.from_numpy(y), **stored)

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.config.augment
        if mode == "none":
            return x
        n, _, h, w = x.shape
        pad = max(1, min(h, w) // 14)  # 2 px on 28 px digits
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = self.rng.integers(0, 2 * pad + 1, n)
        dx = self.rng.integers(0, 2 * pad + 1, n)
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        if mode == "shift+flip":
            flip = torch.from_numpy(self.rng.random(n) < 0.5)
            out[flip] = out[flip].flip(-1)
        if self.config.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _learn_step(self, raw: np.ndarray, xt: torch.Tensor, targets: np.ndarray,
                    keep: bool, zt: torch.Tensor | None = None,
                    repeat: int = 0) -> tuple[float, np.ndarray]:
        """One optimizer step on the stream batch and the terms' replay draws. Returns the
        loss and the argmax of the batch's pre-update logits; `keep` offers the batch to
        the buffer (once per batch, however many iterations learn it). `zt`: the batch's
        latents, once the layers of latent replay are frozen; `repeat`: which of the batch's
        iterations this is."""
        step = Step(index=self.steps, num_classes=len(self.labels), repeat=repeat)
        step.add("stream", xt, torch.from_numpy(targets), latent=zt)
        for term in self.terms:
            term.prepare(step, self.rng)
        step.seal()
        step.label_shift = self._label_shift(step.y)
        if self.teacher is not None:
            step.teacher_logits = self._teacher_logits(step)
        if self.anchor is not None:
            with torch.no_grad():
                if self.anchor_taps:
                    step.anchor_logits, step.anchor_features = self.anchor(step.x, self.anchor_taps)
                else:
                    step.anchor_logits = self.anchor(step.x)
        self.latent.train(self.student)
        warm_start_batchnorm(self.student, self.config.bn_momentum)
        # the train-mode forward moves BatchNorm's running statistics before the loss is
        # known; a skipped step puts them back, so a non-finite batch cannot poison eval mode
        bn_before = {k: v.clone() for k, v in self.student.named_buffers()}
        self._forward(step, latent=zt is not None)
        predicted = step.logits_of("stream").detach().argmax(dim=1).numpy()
        loss = stream_cross_entropy(step.class_logits_of("stream"), step.labels_of("stream"),
                                    self.config.stream_loss)
        for term in self.terms:
            extra = term.loss(step)
            if extra is not None:
                loss = loss + extra
        value = float(loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        # BatchNorm can normalize huge activations to a finite loss while its running
        # variance overflows: that step is refused too
        learned = np.isfinite(value) and _all_finite(self.student.buffers())
        if learned:
            loss.backward()
            learned = self._gradients_finite()
        if learned:
            for term in self.terms:
                term.after_backward(step)
            self.optimizer.step()
            if keep:
                self._keep(raw, targets, step.logits_of("stream").detach().numpy(), zt)
        else:  # neither learned nor kept for replay: one bad batch must not poison the model
            self.optimizer.zero_grad(set_to_none=True)
            self.student.load_state_dict(bn_before, strict=False)
            self.skipped_steps += 1
        self.steps += 1
        self.last_loss = value
        if self.steps - self.last_consolidation >= self.config.consolidate_every:
            self._consolidate()
        return value, predicted

    def _forward(self, step: Step, latent: bool) -> None:
        """The student's train-mode forward over the whole step (from the latents of every
        part under latent replay), with the taps some term asked for."""
        if latent:
            latents = torch.cat([part.latent for part in step.parts.values()])
            step.logits = self.latent.suffix(self.student, latents)
        elif self.student_taps:
            step.logits, step.features = self.student(step.x, self.student_taps)
        else:
            step.logits = self.student(step.x)

    def _keep(self, raw: np.ndarray, targets: np.ndarray, logits: np.ndarray,
              zt: torch.Tensor | None) -> None:
        """Offer the learned batch to the buffer (with its latents, under latent replay)."""
        slots = self.buffer.add(raw, targets, logits)
        keep = slots >= 0
        if zt is not None and keep.any():
            self.latent.store(self.buffer.capacity, slots[keep], zt[torch.from_numpy(keep)])

    def _label_shift(self, labels: torch.Tensor) -> torch.Tensor | None:
        """tau * log(prior): the running share of each class among the labels of the batches
        trained on (stream and replay), this step's included (Huang et al., "Online Continual
        Learning via Logit Adjusted Softmax", TMLR 2024). The class of the current task is
        most of every batch; its shifted logit must beat the others by more to lower the
        loss, which cancels the recency bias of the head. Prediction uses raw logits."""
        tau = self.config.logit_adjust
        if not tau:
            return None
        n = len(self.labels)
        if len(self.label_prior) < n:
            self.label_prior = torch.cat([self.label_prior, torch.zeros(n - len(self.label_prior))])
        share = torch.bincount(labels, minlength=n).float() / len(labels)
        decay = self.config.prior_decay
        self.label_prior = decay * self.label_prior + (1 - decay) * share
        prior = self.label_prior / self.label_prior.sum()
        return tau * torch.log(prior.clamp_min(1e-6))

    def _gradients_finite(self) -> bool:
        """A finite loss can still give an overflowing gradient (a huge lr, an extreme
        input); such a step is skipped like a non-finite loss rather than applied."""
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        # the norm is finite only if every element is, and lr * norm bounds any update
        return bool(torch.isfinite(torch.stack([g.norm() for g in grads]).norm() * self.config.lr))

    def _teacher_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Teacher logits; with the taps some term asked for, kept detached in the step."""
        if not self.teacher_taps:
            return self.teacher(x), {}
        return self.teacher(x, self.teacher_taps)

    def _teacher_logits(self, step: Step) -> torch.Tensor:
        """Online: the teacher takes its own step on the same batch and replay, and its
        pre-step logits are the soft targets. Frozen: a no-grad forward, columns mapped to
        the student's label order (classes the teacher never saw get no target)."""
        if self.teacher_optimizer is not None:
            self.teacher.train()
            logits, maps = self._teacher_forward(step.x)
            step.teacher_features = {k: v.detach() for k, v in maps.items()}
            loss = F.cross_entropy(logits, step.y)
            self.teacher_optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                self.teacher_optimizer.step()
            return logits.detach()
        with torch.no_grad():
            self.teacher.eval()
            logits, step.teacher_features = self._teacher_forward(step.x)
        cols = [self.teacher_labels.index(label) if label in self.teacher_labels else -1
                for label in self.labels]
        if any(c < 0 for c in cols):
            raise ValueError("frozen teacher does not know labels "
                             f"{[l for l, c in zip(self.labels, cols) if c < 0]}")
        return logits[:, cols].clone()

    # --------------------------------------------------------------- teachers
    def save_teacher(self, path: str) -> None:
        """Write the online teacher as a checkpoint that `teacher='frozen:PATH'` loads."""
        if self.teacher is None:
            raise RuntimeError("this learner has no teacher to save")
        torch.save({"kind": "edgecl-teacher", "arch": self.teacher.arch,
                    "labels": list(self.labels), "input_shape": self.input_shape,
                    "state_dict": self.teacher.state_dict()}, path)

    def _load_frozen_teacher(self, path: str) -> None:
        try:  # weights_only: tensors and plain containers; a planted pickle cannot run
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"teacher checkpoint {path!r} does not exist") from None
        except Exception as exc:  # unpickling refused or a damaged file: say which file
            raise ValueError(f"{path!r} is not a teacher checkpoint edgecl can load "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        if not isinstance(ckpt, dict) or ckpt.get("kind") != "edgecl-teacher":
            raise ValueError(f"{path!r} is not a teacher checkpoint written by edgecl")
        c, h, w = ckpt["input_shape"]
        self.teacher = build_teacher(len(ckpt["labels"]), c, max(h, w), ckpt["arch"])
        self.teacher.load_state_dict(ckpt["state_dict"])
        self.teacher = self._prepare(self.teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_labels = list(ckpt["labels"])

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The whole learner: models, optimizers, buffer, terms, labels, counters, RNG."""
        return {
            "config": asdict(self.config),
            "labels": list(self.labels),
            "input_shape": self.input_shape,
            "input_dtype": self.input_dtype,
            "student": None if self.student is None else self.student.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "teacher_optimizer": (None if self.teacher_optimizer is None
                                  else self.teacher_optimizer.state_dict()),
            "teacher_labels": self.teacher_labels,
            "anchor": None if self.anchor is None else self.anchor.state_dict(),
            "buffer": self.buffer.state_dict(),
            "terms": {t.name: t.state_dict() for t in self.terms},
            "prequential": self.prequential.state_dict(),
            "counters": {"steps": self.steps, "samples_learned": self.samples_learned,
                         "samples_offered": self.samples_offered,
                         "skipped_steps": self.skipped_steps,
                         "last_consolidation": self.last_consolidation,
                         "class_counts": list(self.class_counts), "merges": self.merges,
                         "samples_at_merge": self.samples_at_merge},
            "label_prior": self.label_prior.clone(),
            "latent": self.latent.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if asdict(self.config) != state["config"]:
            self.__init__(LearnerConfig(**state["config"]))
        self.labels = list(state["labels"])
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.input_shape = None if state["input_shape"] is None else tuple(state["input_shape"])
        self.input_dtype = state["input_dtype"]
        if state["student"] is not None:
            self.student = None
            saved_labels = self.labels
            self._grow(0, len(saved_labels))  # builds fresh models at the saved width
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state["teacher"] is not None and self.teacher is not None:
                self.teacher.load_state_dict(state["teacher"])
                if self.teacher_optimizer is not None:
                    self.teacher_optimizer.load_state_dict(state["teacher_optimizer"])
        self.teacher_labels = state["teacher_labels"]
        anchor = state.get("anchor")
        self.anchor = None
        if anchor is not None and self.student is not None:
            self.anchor = frozen_copy(self.student, num_classes=anchor["head.weight"].shape[0])
            self.anchor.load_state_dict(anchor)
        self.buffer.load_state_dict(state["buffer"])
        for term in self.terms:
            term.load_state_dict(state["terms"][term.name])
        self.prequential.load_state_dict(state["prequential"])
        counters = state["counters"]
        self.steps = counters["steps"]
        self.samples_learned = counters["samples_learned"]
        self.samples_offered = counters.get("samples_offered", 0)  # older checkpoints: none
        self.skipped_steps = counters["skipped_steps"]
        self.last_consolidation = counters["last_consolidation"]
        self._load_merge_counters(counters)
        self.label_prior = state.get("label_prior", torch.zeros(0)).clone()
        self.latent = LatentReplay(self.config.latent_layers, self.config.latent_after)
        if state.get("latent", {}).get("frozen") and self.student is not None:
            # latents are a function of the raw inputs and the frozen layers: recomputed
            self.latent.freeze(self.student, self.buffer, self._to_tensor)
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])

    def _load_merge_counters(self, counters: dict) -> None:
        """Checkpoints before federation (0.1.0) have no per-class counts: they are the
        prequential totals, which count every learned sample once, before it was learned."""
        counts = counters.get("class_counts")
        if counts is None:
            totals = self.prequential.per_class
            counts = [int(totals.get(k, (0, 0))[1]) for k in range(len(self.labels))]
        self.class_counts = [int(c) for c in counts] + [0] * (len(self.labels) - len(counts))
        self.merges = int(counters.get("merges", 0))
        self.samples_at_merge = int(counters.get("samples_at_merge", 0))


def stream_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The incoming batch's loss. 'ce': over every class. 'ace' (ER-ACE, Caccia et al.
    2022): only over the classes present in the batch, so a batch of a new class pulls its
    own logits up without pushing every old class's down; replay terms keep their full CE,
    and they are what separates old classes from new ones."""
    if kind == "ace":
        present = torch.zeros(logits.shape[1], dtype=torch.bool)
        present[targets] = True
        logits = logits.masked_fill(~present, float("-inf"))
    return F.cross_entropy(logits, targets)


def make_optimizer(params, config: LearnerConfig) -> torch.optim.Optimizer:
    """The student's optimizer: plain SGD (the paper setting) or Adam, whose per-parameter
    step sizes learn a model trained from scratch in fewer steps."""
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)


def warm_start_batchnorm(model: EdgeNet, momentum: float) -> None:
    """Until a BatchNorm layer has tracked 1/momentum batches, its running statistics are
    the plain mean of the batches it saw (momentum 1/(n+1)), not an exponential average
    that still holds most of the initial mean 0 and variance 1. Those initial values are
    far from a fresh student's activations, and their error compounds layer by layer: in
    eval mode (predictions, exports, merged models) every input then embeds alike and the
    model predicts one class for its first tens of steps."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d) and m.training:
            m.momentum = max(momentum, 1.0 / (int(m.num_batches_tracked) + 1))


@torch.no_grad()
def refresh_batchnorm(model: EdgeNet, x: torch.Tensor, chunk: int = 100) -> None:
    """Replace every BatchNorm layer's running statistics with their plain average over `x`
    (train-mode forwards, no gradient). Early in a stream the running averages lag weights
    that move fast, and the stream's recent batches are mostly one task; the replay buffer
    is a sample of the whole stream, as the classes a device will see are."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the chunks
    model.train()
    try:
        for start in range(0, len(x), chunk):
            model.embed(x[start:start + chunk])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


@torch.no_grad()
def imprint_rows(model: EdgeNet, x: torch.Tensor, targets: np.ndarray, rows) -> None:
    """Weight imprinting (Qi et al., "Low-Shot Learning with Imprinted Weights", CVPR 2018):
    a new class's head row starts as the direction of its samples' mean embedding, at the
    mean length of the other rows, with their mean bias, instead of a random row that the
    class must first pull into place. Samples of a short stream are few; this spends none
    of them on that. The model embeds in the mode the caller set (the learner's training
    mode: batch statistics), with the running statistics left as they were."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running statistics keep their value
    try:
        h = F.normalize(model.embed(x), dim=1)
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
    head = model.head
    rows = list(rows)
    others = [r for r in range(head.out_features) if r not in rows]
    reference = others or rows  # the first classes: the random rows' own scale
    length = head.weight[reference].norm(dim=1).mean()
    bias = head.bias[others].mean() if others else torch.zeros(())
    labels = torch.from_numpy(targets)
    for r in rows:
        head.weight[r] = F.normalize(h[labels == r].mean(dim=0), dim=0) * length
        head.bias[r] = bias


def _union(groups) -> tuple[str, ...]:
    """Names from several tuples, each once, in first-seen order."""
    return tuple(dict.fromkeys(name for group in groups for name in group))


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _grow_head(model: EdgeNet, optimizer: torch.optim.Optimizer, new_n: int) -> None:
    """Widen the head and move its optimizer state (momentum) to the new parameters,
    zero-padded for the new rows, so old classes keep learning exactly as before."""
    old_params, new_params = model.head.grow(new_n)
    for old, new in zip(old_params, new_params):
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
        state = optimizer.state.pop(old, None)
        if state:
            moved = {}
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == old.shape:
                    padded = torch.zeros_like(new)
                    padded[: old.shape[0]] = value
                    value = padded
                moved[key] = value
            optimizer.state[new] = moved
