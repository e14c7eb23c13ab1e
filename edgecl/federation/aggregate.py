"""Aggregating site models whose heads know different classes (numpy only, no Flower).

Every site's head has its own label order, so rows are aligned by label name first. Then:

- `class_aware` (edgecl's strategy): the backbone (every array but the head, BatchNorm
  statistics included) is the average of the sites' arrays, weighted by what each learned
  since the last round. Each head row is averaged only over the sites that have learned
  that class, weighted by how many samples of it each learned: a class one site knows keeps
  that site's row instead of being blurred toward rows that never saw it.
- `fedavg` (plain FedAvg, for comparison): every array, head rows included, weighted by what
  each site learned since the last round; a site without a row for a class counts as a zero
  row there (a freshly widened head), so a class one site knows is averaged with the others'
  zeros or their pushed-down rows.

Under both, a BatchNorm layer's running variance is that of the union of the sites' inputs
(`pool_running_variances`), not the average of their variances.

A site that learned nothing since the last round weighs nothing in the backbone; if no site
learned anything, all weigh the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HEAD_KEYS = ("head.weight", "head.bias")   # the student's head: one row per class
STRATEGIES = ("class-aware", "fedavg")
BN_VARIANCES = ("union", "mean")  # a merged BatchNorm running variance (pool_running_variances)


@dataclass
class SiteModel:
    """One site's student as its daemon reported it (`model.get`)."""
    labels: list                      # head order
    counts: list[int]                 # samples learned per class (cumulative), head order
    learned_since_merge: int          # the site's backbone weight this round
    arrays: dict[str, np.ndarray]     # state_dict order; HEAD_KEYS rows follow `labels`
    arch: str = ""
    name: str = ""


@dataclass
class GlobalModel:
    labels: list
    counts: list[int]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def label_order(sites: list[SiteModel]) -> list:
    """Every label any site has, in one order whatever order the replies came in: ints
    ascending, then strings."""
    labels = {label for site in sites for label in site.labels}
    return sorted(labels, key=lambda v: (isinstance(v, str), v))


def check_compatible(sites: list[SiteModel]) -> None:
    """Sites must run the same student: same architecture fingerprint and array names."""
    if not sites:
        raise ValueError("no site models to aggregate")
    first = sites[0]
    for site in sites[1:]:
        if site.arch != first.arch or list(site.arrays) != list(first.arrays):
            raise ValueError(f"site {site.name or '?'} runs another student than site "
                             f"{first.name or '?'} (architecture {site.arch!r} vs "
                             f"{first.arch!r}); every site needs the same model settings")


def _weights(values: list[float]) -> np.ndarray:
    w = np.asarray(values, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones_like(w)
    return w / w.sum()


def _average(arrays: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    out = np.zeros_like(arrays[0], dtype=np.float64)
    for a, w in zip(arrays, weights):
        out += w * a
    return out.astype(arrays[0].dtype)


def _rows(site: SiteModel, key: str, label) -> np.ndarray | None:
    """The site's head row (weight or bias) for `label`, or None if its head lacks it."""
    if label not in site.labels:
        return None
    return site.arrays[key][site.labels.index(label)]


def _head(sites: list[SiteModel], labels: list, key: str, strategy: str,
          backbone_w: np.ndarray) -> np.ndarray:
    shape = sites[0].arrays[key].shape[1:]
    out = np.zeros((len(labels), *shape), dtype=sites[0].arrays[key].dtype)
    for i, label in enumerate(labels):
        rows = [_rows(site, key, label) for site in sites]
        if strategy == "fedavg":
            filled = [r if r is not None else np.zeros(shape, out.dtype) for r in rows]
            out[i] = _average(filled, backbone_w)
            continue
        have = [(r, site.counts[site.labels.index(label)])
                for r, site in zip(rows, sites) if r is not None]
        seen = [(r, c) for r, c in have if c > 0] or [(r, 1) for r, _ in have]
        out[i] = _average([r for r, _ in seen], _weights([c for _, c in seen]))
    return out


def aggregate(sites: list[SiteModel], strategy: str = "class-aware",
              bn_variance: str = "union") -> GlobalModel:
    """The global model of one round (see the module docstring for the two strategies)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if bn_variance not in BN_VARIANCES:
        raise ValueError(f"bn_variance must be one of {', '.join(BN_VARIANCES)}")
    check_compatible(sites)
    labels = label_order(sites)
    backbone_w = _weights([site.learned_since_merge for site in sites])
    arrays = {}
    for key in sites[0].arrays:
        if key in HEAD_KEYS:
            arrays[key] = _head(sites, labels, key, strategy, backbone_w)
        else:
            arrays[key] = _average([site.arrays[key] for site in sites], backbone_w)
    if bn_variance == "union":
        pool_running_variances(sites, arrays, backbone_w)
    counts = [sum(site.counts[site.labels.index(label)] for site in sites
                  if label in site.labels) for label in labels]
    return GlobalModel(labels, counts, arrays)


def pool_running_variances(sites: list[SiteModel], arrays: dict[str, np.ndarray],
                           weights: np.ndarray) -> None:
    """Each BatchNorm layer's running variance as the variance of the union of the sites'
    inputs: the weighted mean of the sites' variances plus the spread of their means around
    the averaged mean. Sites that see different classes see different activation means; the
    plain average of their variances leaves that spread out, and every layer of the merged
    model then over-scales inputs from all the classes at once. In place."""
    for key in arrays:
        if not key.endswith(".running_var"):
            continue
        mean_key = key[:-len("running_var")] + "running_mean"
        if mean_key not in arrays:
            continue
        pooled = np.zeros_like(arrays[key], dtype=np.float64)
        for site, w in zip(sites, weights):
            spread = site.arrays[mean_key].astype(np.float64) - arrays[mean_key]
            pooled += w * (site.arrays[key] + spread ** 2)
        arrays[key] = pooled.astype(arrays[key].dtype)
