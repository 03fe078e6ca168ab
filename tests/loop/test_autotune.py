"""Tree shape "auto" (eagle2.autotune): the cost model picks the obviously best shape on
synthetic timings and acceptance, the calibration recovers known acceptance rates, candidate
replay and labelling follow the EAGLE-2 growth, the cache round-trips, and "auto" decodes
exactly like plain decoding on a tiny float64 Llama."""
import copy
import functools
import json

import numpy as np
import pytest
import torch
from loop_helpers import cheat_head, ragged_prompts, tiny_target

import eagle2
from eagle2 import Generator, TreeShape
from eagle2 import autotune as at


def costs(target, draft_per_level=0.1, catch_up=0.0, depths=range(1, 9), branchings=(1, 2, 4)):
    sizes = [1, 2, 4, 8, 16, 32, 64]
    return at.Costs(sizes, [target(m) for m in sizes], {f"{d},{k}": draft_per_level * d for d in depths for k in branchings},
                    catch_up)


def acceptance(curves: dict) -> at.Acceptance:
    full = {f"{d},{k}": curves.get((d, k), [1.0] * 64) for d in range(1, 9) for k in (1, 2, 4)}
    return at.Acceptance(full, full, full, 1)


def saturating(per_node: float, nodes: int) -> list[float]:
    """E[accepted + 1] when the first `nodes` nodes each add per_node, later ones nothing."""
    return [1.0 + per_node * min(m - 1, nodes) for m in range(1, 65)]


def test_choose_prefers_smallest_tree_that_reaches_the_acceptance():
    cpu_like = lambda m: 1.0 if m <= 8 else 1.0 + (m - 8) * 0.2  # noqa: E731
    acc = acceptance({(3, 2): saturating(0.9, 3), (6, 2): saturating(0.5, 6)})
    shape, rows = at.choose(costs(cpu_like), acc)
    # (m=4, d=3, k=2): tau 3.7 in 1.3 s. Larger m has the same rate here (flat cost, saturated
    # acceptance): the tie goes to the smaller tree. (6, 2) reaches tau 4 but in 1.6 s.
    assert shape == TreeShape(4, 3, 2)
    assert rows[0]["rate"] == pytest.approx(3.7 / 1.3)
    assert all(r["rate"] <= rows[0]["rate"] for r in rows)


def test_choose_grows_the_tree_when_verify_is_free():
    gpu_like = lambda m: 1.0  # noqa: E731
    curve = [1.0 + 0.05 * (m - 1) for m in range(1, 65)]  # every node adds a little
    shape, _ = at.choose(costs(gpu_like, draft_per_level=0.01), acceptance({(8, 4): curve}))
    assert shape == TreeShape(64, 8, 4)
    shape, _ = at.choose(costs(gpu_like, draft_per_level=0.01), acceptance({(8, 4): curve}), max_m=24)
    assert shape == TreeShape(24, 8, 4)


def test_choose_falls_back_to_the_root_when_the_draft_is_useless():
    shape, rows = at.choose(costs(lambda m: 1.0 + 0.01 * m, catch_up=0.05), acceptance({}))
    assert shape == TreeShape(1, 1, 1) and rows[0]["tau"] == 1.0


def test_choose_respects_the_number_of_candidates():
    shape, _ = at.choose(costs(lambda m: 1.0), acceptance({(2, 1): [float(m) for m in range(1, 65)]}))
    assert shape.total_tokens <= 1 + TreeShape(1, shape.depth, shape.branching).candidates()


def test_calibration_recovers_a_known_acceptance_rate():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.001, 1.0, 40000)
    accepted = rng.uniform(size=p.size) < 0.5 * p  # the draft is twice too confident
    rates = at.calibration_map(np.log(p), accepted)
    assert np.all(np.diff(rates) >= 0)
    mids = (at.BIN_EDGES[:-1] + np.minimum(at.BIN_EDGES[1:], 1.0)) / 2
    np.testing.assert_allclose(rates, 0.5 * mids, atol=0.05)
    np.testing.assert_allclose(at.apply_map(rates, np.log([0.25, 0.99])), [rates[4], rates[-1]])


def test_calibration_of_a_confident_but_wrong_draft_stays_low():
    scores = np.log(np.r_[np.full(50, 0.99), np.full(500, 0.001)])
    rates = at.calibration_map(scores, np.zeros(scores.size, dtype=bool))
    assert rates.max() < 0.1


def test_label_step_follows_the_continuation():
    # root -> a(5) -> c(7); root -> b(6); a -> d(8)
    parents = np.array([-1, -1, 0, 0])
    tokens = np.array([5, 6, 7, 8])
    step = at.label_step(np.log([0.6, 0.3, 0.4, 0.1]), parents, tokens, [5, 7, 9])
    assert step.accepted.tolist() == [True, False, True, False]
    assert at.label_step(np.zeros(4), parents, tokens, [5]).accepted.tolist() == [True, False, False, False]


def test_replay_order_is_the_beam_growth():
    # depth 1: a .5, b .3 ; a's children a1 .4, a2 .05 ; b's children b1 .25, b2 .2 ; a1's child a11 .3
    s = np.log([0.5, 0.3, 0.4, 0.05, 0.25, 0.2, 0.3])
    step = at.Step(s, np.array([-1, -1, 0, 0, 1, 1, 2]), np.zeros(7, dtype=bool))
    assert at.replay_order(step, 3, 2).tolist() == [0, 2, 1, 6, 4, 5, 3]
    assert at.replay_order(step, 1, 2).tolist() == [0, 1]
    assert at.replay_order(step, 3, 1).tolist() == [0, 2, 6]  # beam of one: a, a1, a11
    curves = at.acceptance_curves([step], np.linspace(0, 1, len(at.BIN_EDGES) - 1), 8)
    assert len(curves.expected["3,2"]) == 8 and curves.expected["3,2"][0] == 1.0
    assert np.all(np.diff(curves.expected["3,2"]) >= 0)


@pytest.fixture(scope="module")
def gen():
    target = tiny_target(layer_scale=0.3, logit_scale=4.0)
    return Generator(target, head=cheat_head(target), shape=TreeShape(6, 3, 2))


SMALL = dict(sizes=(1, 2, 4, 8), depths=(1, 2, 3), branchings=(1, 2), prefix=32, repeats=3)


def test_measurements_on_a_tiny_model(gen, monkeypatch):
    c = at.measure_costs(gen, **SMALL)
    assert c.sizes == [1, 2, 4, 8] and all(t > 0 for t in c.target) and c.catch_up > 0
    assert set(c.draft) == {f"{d},{k}" for d in (1, 2, 3) for k in (1, 2)}
    monkeypatch.setattr(at, "DEPTHS", (1, 2, 3))
    monkeypatch.setattr(at, "BRANCHINGS", (1, 2))
    acc = at.measure_acceptance(gen, prompts=ragged_prompts(2, 160, seed=3, min_len=4), max_new_tokens=16, max_m=8)
    assert acc.steps > 0 and set(acc.expected) == set(c.draft)
    # The cheat head guesses the tiny target well: calibration must see accepted drafts.
    assert acc.observed["3,2"][-1] > 1.5
    w = at.PRIOR_STEPS / (at.PRIOR_STEPS + acc.steps)
    np.testing.assert_allclose(acc.expected["3,2"], w * np.array(acc.scored["3,2"]) + (1 - w) * np.array(
        acc.observed["3,2"]), atol=1e-4)
    assert all(np.diff(acc.observed["3,2"]) >= 0) and acc.expected["2,1"][0] == 1.0
    shape, rows = at.choose(c, acc)
    assert rows[0]["rate"] == max(r["rate"] for r in rows)


@pytest.fixture
def fast_tuning(monkeypatch, tmp_path):
    """Cache in tmp_path; small grids; count the measurements."""
    monkeypatch.setenv("EAGLE2_CACHE", str(tmp_path))
    monkeypatch.setattr(at, "DEPTHS", (1, 2, 3))
    monkeypatch.setattr(at, "BRANCHINGS", (1, 2))
    calls = {"costs": 0, "acceptance": 0}

    def counted(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(at, "measure_costs", counted("costs", functools.partial(at.measure_costs, **SMALL)))
    monkeypatch.setattr(at, "measure_acceptance", counted("acceptance", functools.partial(
        at.measure_acceptance, max_new_tokens=12, max_m=8)))
    return calls, tmp_path


def test_cache_round_trip_and_forget(gen, fast_tuning):
    calls, root = fast_tuning
    at.forget(gen)
    assert at.tuned_shape(gen, measure=False) is None and calls == {"costs": 0, "acceptance": 0}
    first = at.tuned_shape(gen)
    assert calls == {"costs": 1, "acceptance": 1}
    files = sorted((root / "autotune").glob("*.json"))
    assert [f.name.split("-")[0] for f in files] == ["acceptance", "costs"]
    assert at.tuned_shape(gen) == first and calls["costs"] == 1  # memoised
    fresh = Generator(gen.model, head=gen.head, shape=gen.shape)
    assert at.tuned_shape(fresh) == first and calls == {"costs": 1, "acceptance": 1}  # read back from disk
    saved = json.loads(files[1].read_text())
    assert saved["key"]["threads"] >= 1 and "machine" in saved["key"]
    assert at.Costs(**saved["data"]) == at._load(saved["key"], at.Costs)
    at.tuned_shape(fresh, temperature=1.0)  # sampling: new acceptance, same costs
    assert calls == {"costs": 1, "acceptance": 2}
    at.tuned_shape(fresh, temperature=0.7)  # every temperature > 0 shares the sampling measurement
    assert calls == {"costs": 1, "acceptance": 2}
    files[1].write_text("{not json")  # a corrupt file is measured again
    at._MEMO.clear()
    at.tuned_shape(fresh)
    assert calls["costs"] == 2
    at.forget(fresh)
    assert list((root / "autotune").glob("*.json")) == []


def test_an_untuned_generator_looks_for_the_cache_files_without_rehashing(gen, fast_tuning, monkeypatch):
    """Every generate() of an untuned shape="auto" Generator asks tuned_shape(measure=False):
    after the first miss it only checks for the cache files, and finds a tune that another
    Generator (another process) wrote meanwhile."""
    calls, _ = fast_tuning
    at.forget(gen)
    untuned = Generator(gen.model, head=gen.head, shape=gen.shape)
    hashed = []
    monkeypatch.setattr(at, "cache_keys", lambda *a, _keys=at.cache_keys, **k: hashed.append(1) or _keys(*a, **k))
    assert at.tuned_shape(untuned, measure=False) is None and len(hashed) == 1
    assert at.tuned_shape(untuned, measure=False) is None and len(hashed) == 1  # memoised miss
    tuned = at.tuned_shape(Generator(gen.model, head=gen.head, shape=gen.shape))  # writes the cache files
    assert calls == {"costs": 1, "acceptance": 1}
    assert at.tuned_shape(untuned, measure=False) == tuned and calls["costs"] == 1  # found, not measured
    assert at.tuned_shape(untuned, measure=False) == tuned and len(hashed) == 3
    at.forget(untuned)


def test_forgetting_one_regime_keeps_the_others_acceptance(gen, fast_tuning):
    """`eagle2 tune --temperature 1` re-measures the costs and the sampling acceptance; the greedy
    acceptance, measured whenever greedy was tuned, stays."""
    calls, root = fast_tuning
    at.forget(gen)
    at.tuned_shape(gen)
    at.tuned_shape(gen, temperature=1.0)
    assert calls == {"costs": 1, "acceptance": 2}
    at.forget(gen, 1.0)
    names = sorted(f.name for f in (root / "autotune").glob("*.json"))
    assert names == [at.cache_path(at.cache_keys(gen, 0.0)["acceptance"]).name]
    at.tuned_shape(gen, temperature=1.0)
    at.tuned_shape(gen)
    assert calls == {"costs": 2, "acceptance": 3}  # greedy came from the cache


def test_draft_costs_are_keyed_by_the_heads_size_and_dtype(gen):
    """A deeper head, or one in another dtype, drafts at another cost (and the dtype can change
    what it proposes): neither may reuse a cached measurement."""
    keys = at.cache_keys(gen, 0.0)
    deeper = Generator(gen.model, head=gen.head.grown(2), shape=gen.shape)
    assert at.cache_keys(deeper, 0.0)["costs"] != keys["costs"]
    narrower = Generator(gen.model, head=copy.deepcopy(gen.head).to(torch.float32), shape=gen.shape)
    assert all(at.cache_keys(narrower, 0.0)[kind] != keys[kind] for kind in ("costs", "acceptance"))
    assert at.cache_keys(Generator(gen.model, head=gen.head, shape=gen.shape), 0.0) == keys


def test_untuned_auto_uses_the_default_shape_without_measuring(gen, fast_tuning, capsys):
    calls, _ = fast_tuning
    at.forget(gen)
    untuned = Generator(gen.model, head=gen.head, shape="auto")
    assert untuned.tree_shape() == eagle2.DEFAULT_SHAPE
    assert untuned.tree_shape(depth=2) == TreeShape(eagle2.DEFAULT_SHAPE.total_tokens, 2, eagle2.DEFAULT_SHAPE.branching)
    assert calls == {"costs": 0, "acceptance": 0}
    assert capsys.readouterr().err.count("eagle2 tune") == 1  # said once
    untuned.tree_shape(total_tokens="auto")  # asked for: measured now (and at 1 thread, for a busy machine)
    assert calls == {"costs": 1 + (torch.get_num_threads() > 1), "acceptance": 1}


def test_the_tree_for_a_busy_machine_is_tuned_at_one_thread(gen, fast_tuning):
    """total_tokens="auto" (eagle2 tune) also measures the costs at 1 thread, cached apart,
    with torch's thread count restored; reduced_shape reads that tree, and is None at 1 thread;
    forget drops both."""
    calls, root = fast_tuning
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        at.forget(gen)
        assert at.reduced_shape(gen) is None  # nothing measured: nothing read
        gen.tree_shape(total_tokens="auto")
        assert calls == {"costs": 2, "acceptance": 1} and torch.get_num_threads() == 2
        keys = [json.loads(f.read_text())["key"] for f in (root / "autotune").glob("costs-*.json")]
        assert sorted(k["threads"] for k in keys) == [1, 2]
        one = at.reduced_shape(gen)
        assert isinstance(one, TreeShape) and one == at.tuned_shape(gen, threads=1, measure=False)
        torch.set_num_threads(1)
        assert at.reduced_shape(gen) is None
        torch.set_num_threads(2)
        at.forget(gen)
        assert list((root / "autotune").glob("costs-*.json")) == []
    finally:
        torch.set_num_threads(saved)


def test_auto_shape_decodes_exactly(gen, fast_tuning):
    prompts = ragged_prompts(3, 160, seed=5, min_len=3)
    auto = gen.generate(prompts, max_new_tokens=16, total_tokens="auto")
    vanilla = gen.generate(prompts, max_new_tokens=16, method="vanilla")
    assert [r.tokens for r in auto] == [r.tokens for r in vanilla]
    by_default = Generator(gen.model, head=gen.head, shape="auto")
    assert [r.tokens for r in by_default.generate(prompts, max_new_tokens=16)] == [r.tokens for r in vanilla]
    assert [r.tokens for r in by_default.generate(prompts, max_new_tokens=16, method="vanilla")] == \
        [r.tokens for r in vanilla]
    # Explicit sizes still win over the "auto" default: a one-node tree is plain decoding.
    one = by_default.generate(prompts, max_new_tokens=16, total_tokens=1)
    assert [r.target_forwards for r in one] == [r.target_forwards for r in vanilla]
    # ... and a fully explicit shape measures nothing.
    at.forget(by_default)
    calls, _ = fast_tuning
    before = dict(calls)
    explicit = by_default.generate(prompts, max_new_tokens=16, total_tokens=6, depth=3, branching=2)
    assert [r.tokens for r in explicit] == [r.tokens for r in vanilla] and calls == before
