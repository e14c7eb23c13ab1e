"""Federation on the learner's side: read the student as plain arrays, and merge a global
model (e.g. a Flower aggregate of several sites' students) into it.

- `student_arrays`: every floating tensor of the student's state_dict (parameters and
  BatchNorm running statistics; integer buffers such as num_batches_tracked are not model
  content), state_dict order, as float32 numpy copies.
- `layout` / `arch_fingerprint`: what an aggregator and the daemon's checks need to know of
  the student without torch: names, shapes, which arrays are the head, and a fingerprint of
  everything but the head (sites with different fingerprints cannot be averaged).
- `merge_into`: labels are aligned by name (each site's head has its own order); a global
  label the site never saw grows the head through the learner's own growth path; the
  backbone is replaced (BatchNorm statistics per `bn`); the optimizer state is reset; then
  the merged model is a consolidation point, so EWC++ and the anchor terms pull toward it.
  The replay buffer, with DER++'s stored logits, is kept.
- `class_statistics`: per-class embedding statistics of the buffer under a candidate global
  backbone, for a server that calibrates the global head (edgecl/federation/calibrate.py).

Knows nothing of daemons or sockets (docs/architecture.md).
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch

HEAD_PREFIX = "head."
BN_MODES = ("global", "local", "refresh")
BN_STATS = ("running_mean", "running_var")


def float_items(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The floating entries of the model's state_dict, in its order."""
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


def student_arrays(learner) -> list[tuple[str, np.ndarray]]:
    """(name, float32 C-order copy) for every floating array of the student."""
    if learner.student is None:
        raise RuntimeError("the learner has no student yet: it has learned nothing")
    return [(name, np.ascontiguousarray(t.detach().cpu().numpy(), dtype="<f4").copy())
            for name, t in float_items(learner.student)]


def is_head(name: str) -> bool:
    return name.startswith(HEAD_PREFIX)


def layout(learner) -> dict:
    """Names and shapes of the student's arrays (head arrays: shape with the class rows),
    and the architecture fingerprint: plain data, for a thread that must not touch torch."""
    items = float_items(learner.student)
    return {"names": [name for name, _ in items],
            "shapes": [list(t.shape) for _, t in items],
            "head": [is_head(name) for name, _ in items],
            "arch": arch_fingerprint(items, learner.input_shape, learner.input_dtype)}


def arch_fingerprint(items: Sequence[tuple[str, Any]], input_shape, input_dtype) -> str:
    """sha256 over the non-head array names and shapes and the input spec: equal for two
    students that can be averaged, whatever classes their heads hold."""
    body = [[name, list(t.shape)] for name, t in items if not is_head(name)]
    text = json.dumps({"arrays": body, "input": [list(input_shape or ()), input_dtype]},
                      separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def merge_into(learner, labels: list, arrays: dict[str, np.ndarray], bn: str = "global",
               refresh=None) -> dict:
    """Merge the global model (`labels` in its head order, `arrays` by name) into `learner`.

    Head rows are matched by label; a site label the global model lacks keeps its row.
    `refresh(model, x)` re-estimates BatchNorm statistics (bn='refresh'; the learner passes
    its refresh_batchnorm: this module does not import the learner's).
    Returns what a reply reports: the site's labels after the merge, the labels added."""
    if bn not in BN_MODES:
        raise ValueError(f"bn: {bn!r} is not one of {', '.join(BN_MODES)}")
    if learner.student is None:
        raise RuntimeError("the learner has no student yet: it has learned nothing")
    check_arrays(learner, labels, arrays)
    added = [label for label in labels if label not in learner.index]
    if added:
        learner._encode_labels(added)  # the growth path: head, optimizer, terms' on_grow
    learner.class_counts += [0] * (len(learner.labels) - len(learner.class_counts))
    learner.student.load_state_dict(_merged_state(learner, labels, arrays, bn), strict=True)
    learner.optimizer.state.clear()  # momentum of the site's trajectory: meaningless now
    if bn == "refresh" and len(learner.buffer):
        n = len(learner.buffer)
        refresh(learner.student, learner._to_tensor(learner.buffer.x[:n]))
    learner._statistics_at = -1
    if learner.config.merge_logits != "keep" and len(learner.buffer):
        relabel_buffer(learner, learner.config.merge_logits)
    if learner.latent.frozen:  # the buffered latents came from the replaced prefix
        learner.latent.freeze(learner.student, learner.buffer, learner._to_tensor)
    learner._consolidate()  # anchor and EWC++'s theta* become the merged model
    learner.merges += 1
    learner.samples_at_merge = learner.samples_learned
    return {"labels": list(learner.labels), "added": added, "merges": learner.merges}


def relabel_buffer(learner, mode: str) -> None:
    """DER's stored logits after a merge: 'fill' gives each buffered sample the merged
    model's logits for the classes its stored row lacks (classes the merge added), 'replace'
    the merged model's logits for every class. Logit matching then keeps what the federation
    knows of the other sites' classes on this site's own samples while the site learns
    (not-true distillation, FedNTD, Lee et al. 2022). A row stored without logits
    (offer_logits = 'none') lacks every class, so 'fill' gives it all of them."""
    n, buf = len(learner.buffer), learner.buffer
    merged = learner._eval_logits(learner._to_tensor(buf.x[:n])).numpy()  # as it predicts
    width = merged.shape[1]
    buf.widen_logits(width)
    cols = np.arange(width)[None, :]
    take = np.ones((n, width), bool) if mode == "replace" else cols >= buf.logit_width[:n, None]
    buf.logits[:n, :width] = np.where(take, merged, buf.logits[:n, :width])
    buf.logit_width[:n] = width


def check_arrays(learner, labels: list, arrays: dict[str, np.ndarray]) -> None:
    """The global model must have exactly the student's arrays, with its shapes (head rows:
    one per global label). ValueError otherwise (the daemon checks this on the wire first)."""
    if len(set(labels)) != len(labels):
        raise ValueError("labels: a label appears twice")
    expected = dict(float_items(learner.student))
    if list(arrays) != list(expected):
        raise ValueError(f"arrays: expected {list(expected)}, got {list(arrays)}")
    for name, value in arrays.items():
        shape = list(expected[name].shape)
        if is_head(name):
            shape[0] = len(labels)
        if list(np.shape(value)) != shape:
            raise ValueError(f"{name}: shape {list(np.shape(value))}, expected {shape}")
        if not np.isfinite(value).all():
            raise ValueError(f"{name}: values must be finite")


def _merged_state(learner, labels: list, arrays: dict[str, np.ndarray], bn: str) -> dict:
    """The student's state_dict with the global arrays in: the head by label, BatchNorm's
    running statistics kept under bn='local', integer buffers always kept."""
    state = _backbone_state(learner.student, arrays, bn)
    site_rows = torch.tensor([learner.index[label] for label in labels], dtype=torch.long)
    for name, value in arrays.items():
        if is_head(name):
            merged = state[name].detach().clone()
            merged[site_rows] = torch.from_numpy(np.array(value, dtype=np.float32))
            state[name] = merged
    return state


def _backbone_state(model: torch.nn.Module, arrays: dict[str, np.ndarray], bn: str) -> dict:
    """`model`'s state_dict with every global array but the head in (BatchNorm's running
    statistics kept under bn='local', integer buffers always kept)."""
    state = model.state_dict()
    for name, value in arrays.items():
        if is_head(name) or (bn == "local" and name.rsplit(".", 1)[-1] in BN_STATS):
            continue
        state[name] = torch.from_numpy(np.array(value, dtype=np.float32)).to(state[name].dtype)
    return state


STATS_RANK = 16  # principal directions per class in class_statistics


@torch.no_grad()
def class_statistics(learner, arrays: dict[str, np.ndarray], bn: str = "global",
                     refresh=None, rank: int = STATS_RANK, chunk: int = 100) -> dict:
    """Per-class statistics of the replay buffer's embeddings under a candidate global
    model's backbone, as this site would run it after merging it (BatchNorm per `bn`, eval
    mode, as the merged model predicts and is exported), computed on a copy: the learner is
    not changed. What a server needs to calibrate the global head on every site's classes
    without seeing a sample (CCVR, Luo et al., "No Fear of Heterogeneity", NeurIPS 2021):
    for each label in the buffer, the number of samples, the mean and variance of each
    embedding dimension, and the class's `rank` leading principal directions scaled by
    their standard deviation (rows of zeros past the class's sample count): embedding
    dimensions are strongly correlated, and a head fitted to independent ones misjudges
    where classes overlap."""
    if learner.student is None:
        raise RuntimeError("the learner has no student yet: it has learned nothing")
    model = copy.deepcopy(learner.student)
    model.load_state_dict(_backbone_state(model, arrays, bn), strict=True)
    n = len(learner.buffer)
    x = learner._to_tensor(learner.buffer.x[:n]) if n else None
    if bn == "refresh" and n:
        refresh(model, x)
    model.eval()
    feats = [model.embed(x[i:i + chunk]) for i in range(0, n, chunk)]
    emb = torch.cat(feats).double().numpy() if feats else np.zeros((0, model.head.in_features))
    y = learner.buffer.y[:n]
    rows = [int(k) for k in np.unique(y)]
    per_class = [emb[y == k] for k in rows]
    dim = emb.shape[1]
    return {"labels": [learner.labels[k] for k in rows],
            "counts": [len(f) for f in per_class],
            "mean": np.array([f.mean(0) for f in per_class], "<f4").reshape(-1, dim),
            "var": np.array([f.var(0) for f in per_class], "<f4").reshape(-1, dim),
            "components": np.array([principal_directions(f, rank) for f in per_class],
                                   "<f4").reshape(-1, rank, dim)}


def principal_directions(f: np.ndarray, rank: int) -> np.ndarray:
    """The `rank` leading principal directions of the rows of `f`, each scaled by the
    standard deviation along it (so that they sum, as outer products, to the covariance
    within that subspace); zero rows past what the samples span."""
    out = np.zeros((rank, f.shape[1]))
    if rank == 0 or len(f) < 2:
        return out
    _, s, vt = np.linalg.svd(f - f.mean(0), full_matrices=False)
    k = min(rank, len(s))
    out[:k] = vt[:k] * (s[:k, None] / np.sqrt(len(f)))
    return out
