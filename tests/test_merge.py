"""Merging a global model into a learner (edgecl/learn/merge.py), without a daemon: labels by
name, head growth, backbone replaced, BatchNorm options, consolidation, buffer kept."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgecl.learn import LearnerConfig, OnlineLearner
from edgecl.learn.merge import is_head, layout

RNG = np.random.default_rng(0)
X = RNG.integers(0, 256, (120, 1, 8, 8), dtype=np.uint8)


def learner(labels=(0, 1, 2), n=60, **changes) -> OnlineLearner:
    config = dict(method="derpp+ewcpp", buffer_size=20, seed=0, threads=1, iterations=1,
                  bn_refresh=False)
    out = OnlineLearner(LearnerConfig(**{**config, **changes}))
    y = [labels[i % len(labels)] for i in range(n)]
    for start in range(0, n, 10):
        out.learn_many(X[start:start + 10], y[start:start + 10])
    return out


def global_from(site: OnlineLearner, order=None, extra=(), scale=1.5) -> tuple[list, dict]:
    """A 'global model': the site's own arrays changed (x scale), head rows in `order`, plus
    rows for `extra` labels."""
    labels = list(order if order is not None else site.labels)
    arrays = {}
    for name, value in site.model_arrays():
        if is_head(name):
            rows = [value[site.index[label]] * scale for label in labels]
            rows += [np.full(value.shape[1:], 0.25 + i, np.float32) for i, _ in enumerate(extra)]
            arrays[name] = np.stack(rows).astype(np.float32)
        else:
            arrays[name] = (value * scale).astype(np.float32)
    return labels + list(extra), arrays


def state(site: OnlineLearner) -> dict:
    return {k: v.detach().clone() for k, v in site.student.state_dict().items()}


def test_arrays_are_every_float_tensor_in_state_dict_order():
    site = learner()
    names = [name for name, _ in site.model_arrays()]
    sd = site.student.state_dict()
    assert names == [k for k, v in sd.items() if v.is_floating_point()]
    assert not any(k.endswith("num_batches_tracked") for k in names)
    assert any(k.endswith("running_var") for k in names)
    for name, value in site.model_arrays():
        assert value.dtype == np.float32 and value.flags.c_contiguous
        np.testing.assert_array_equal(value, sd[name].numpy())
    info = layout(site)
    assert info["names"] == names and info["arch"].startswith("sha256:")
    assert layout(learner(labels=("a", "b", "c", "d")))["arch"] == info["arch"]  # head aside


def test_labels_align_by_name_whatever_the_global_order():
    site = learner()
    labels, arrays = global_from(site, order=[2, 0, 1])
    site.merge_global(labels, arrays)
    after = dict(site.model_arrays())
    for i, label in enumerate(labels):
        np.testing.assert_allclose(after["head.weight"][site.index[label]], arrays["head.weight"][i])
    assert site.labels == [0, 1, 2] and site.merges == 1


def test_new_global_labels_grow_the_head_and_local_only_rows_are_kept():
    site = learner()
    before = dict(site.model_arrays())
    labels, arrays = global_from(site, order=[1, 2], extra=["x", "y"])  # no 0; two new
    out = site.merge_global(labels, arrays)
    assert out["added"] == ["x", "y"] and site.labels == [0, 1, 2, "x", "y"]
    after = dict(site.model_arrays())
    assert after["head.weight"].shape[0] == 5
    np.testing.assert_array_equal(after["head.weight"][0], before["head.weight"][0])  # local row
    np.testing.assert_allclose(after["head.weight"][3], arrays["head.weight"][2])
    assert site.class_counts == [20, 20, 20, 0, 0]
    # the terms grew with it: a learn step on the new label works
    site.learn_many(X[:10], ["x"] * 10)
    assert site.class_counts[3] == 10


def test_backbone_replaced_and_bn_modes():
    site = learner()
    labels, arrays = global_from(site)
    local = state(site)
    for bn in ("global", "local", "refresh"):
        twin = learner()
        twin.merge_global(labels, arrays, bn=bn)
        got = state(twin)
        conv = next(k for k in arrays if k.endswith("weight") and not is_head(k))
        np.testing.assert_allclose(got[conv].numpy(), arrays[conv])
        var = next(k for k in arrays if k.endswith("running_var"))
        if bn == "global":
            np.testing.assert_allclose(got[var].numpy(), arrays[var])
        elif bn == "local":
            torch.testing.assert_close(got[var], local[var])
        else:  # re-estimated from the buffer: neither
            assert not np.allclose(got[var].numpy(), arrays[var])
            assert not torch.allclose(got[var], local[var])
    with pytest.raises(ValueError, match="bn"):
        site.merge_global(labels, arrays, bn="nope")


def test_class_statistics_are_the_buffers_embedding_moments_under_the_global_backbone():
    site = learner()
    labels, arrays = global_from(site, extra=["new"])
    before = state(site)
    got = site.class_statistics(arrays)
    for name, value in state(site).items():  # computed on a copy: the learner is unchanged
        torch.testing.assert_close(value, before[name])
    twin = learner()
    twin.merge_global(labels, arrays)  # the model the site would run after merging it
    n = len(twin.buffer)
    with torch.inference_mode():
        emb = twin.eval_model().embed(twin._to_tensor(twin.buffer.x[:n])).double().numpy()
    y = np.array([twin.labels[k] for k in twin.buffer.y[:n]])
    assert sorted(got["labels"]) == sorted(set(y.tolist())) and sum(got["counts"]) == n
    for label, count, mean, var in zip(got["labels"], got["counts"], got["mean"], got["var"]):
        assert count == (y == label).sum()
        np.testing.assert_allclose(mean, emb[y == label].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var, emb[y == label].var(0), rtol=1e-3, atol=1e-5)
    local = site.class_statistics(arrays, bn="local")  # the site's own running statistics
    assert not np.allclose(local["mean"], got["mean"])


def test_a_merge_is_a_consolidation_point_and_keeps_the_buffer():
    site = learner()
    buffer_x, buffer_logits = site.buffer.x.copy(), site.buffer.logits.copy()
    labels, arrays = global_from(site)
    site.merge_global(labels, arrays)
    ewc = next(t for t in site.terms if t.name == "ewcpp")
    params = dict(site.student.named_parameters())
    for name, anchor in ewc.anchor.items():
        torch.testing.assert_close(anchor, params[name].detach())
        np.testing.assert_allclose(anchor.numpy(), arrays[name], rtol=1e-6)
    assert site.last_consolidation == site.steps
    assert not site.optimizer.state  # momentum reset
    np.testing.assert_array_equal(site.buffer.x, buffer_x)
    np.testing.assert_array_equal(site.buffer.logits, buffer_logits)
    assert site.learned_since_merge == 0
    site.learn_many(X[:10], [0] * 10)
    assert site.learned_since_merge == 10


@pytest.mark.parametrize("mode", ["fill", "replace", "keep"])
def test_merge_gives_buffered_rows_the_merged_models_logits_per_merge_logits(mode):
    site = learner(labels=(0, 1), merge_logits=mode)
    n = len(site.buffer)
    before, width = site.buffer.logits[:n].copy(), site.buffer.logit_width[:n].copy()
    assert (width == 2).all()
    labels, arrays = global_from(site, extra=(7, 8))
    site.merge_global(labels, arrays)
    with torch.no_grad():
        merged = site.student.eval()(site._to_tensor(site.buffer.x[:n])).numpy()
    stored, widths = site.buffer.logits[:n], site.buffer.logit_width[:n]
    if mode == "keep":
        np.testing.assert_array_equal(widths, width)
        np.testing.assert_array_equal(stored[:, :2], before)
        return
    assert (widths == 4).all()  # DER now matches every class, the merged ones included
    np.testing.assert_allclose(stored[:, 2:], merged[:, 2:], rtol=1e-5, atol=1e-5)
    if mode == "fill":  # the site's own classes keep what the site stored
        np.testing.assert_array_equal(stored[:, :2], before)
    else:
        np.testing.assert_allclose(stored[:, :2], merged[:, :2], rtol=1e-5, atol=1e-5)
    site.learn_many(X[:10], [0] * 10)  # learning goes on over the widened rows
    with pytest.raises(ValueError, match="merge_logits"):
        LearnerConfig(merge_logits="average").validate()


def test_wrong_arrays_are_refused_and_change_nothing():
    site = learner()
    labels, arrays = global_from(site)
    before = state(site)
    bad_name = {("x" + k if i == 0 else k): v for i, (k, v) in enumerate(arrays.items())}
    wide = next(k for k, v in arrays.items() if v.shape and v.shape[0] > 1 and not is_head(k))
    bad_shape = {k: (v[:1] if k == wide else v) for k, v in arrays.items()}
    nan = {k: v.copy() for k, v in arrays.items()}
    next(iter(nan.values())).flat[0] = np.nan
    for bad in (bad_name, bad_shape, nan):
        with pytest.raises(ValueError):
            site.merge_global(labels, bad)
    with pytest.raises(ValueError, match="twice"):
        site.merge_global([0, 0, 1], arrays)
    for k, v in state(site).items():
        torch.testing.assert_close(v, before[k])
    assert site.merges == 0


def test_counters_survive_a_checkpoint_and_old_ones_are_derived():
    site = learner()
    labels, arrays = global_from(site, extra=["z"])
    site.merge_global(labels, arrays)
    site.learn_many(X[:10], ["z"] * 10)
    saved = site.state_dict()
    again = OnlineLearner(site.config)
    again.load_state_dict(saved)
    assert (again.merges, again.samples_at_merge, again.class_counts) == \
           (1, 60, [20, 20, 20, 10])
    for (name, a), (_, b) in zip(site.model_arrays(), again.model_arrays()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    for key in ("class_counts", "merges", "samples_at_merge"):  # a 0.1.0 checkpoint
        del saved["counters"][key]
    old = OnlineLearner(site.config)
    old.load_state_dict(saved)
    assert old.class_counts == [20, 20, 20, 10] and old.merges == 0
