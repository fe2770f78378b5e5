"""``info_nce``'s retrieval options (``negatives``, ``positive_ids``, ``false_negative_margin``) against an fp64
eager reference, in every tier.

The reference, ``reference_info_nce``, is written here from the options' specification, not copied: it builds the
whole (M, N + S) or (M, N + K) logit matrix with plain torch ops in fp64, masks the removed candidates to -inf and
takes a soft-target cross-entropy over ``torch.log_softmax``: the simplest code that states the definition, so that
it can be read by eye. It is itself checked (``test_reference_*``) against ``F.cross_entropy`` when no option is
given and against losses computed by hand for ``positive_ids`` and the margin. The distributed options and the
memory of the tiled path are tested elsewhere.
"""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fusedloss

from conftest import TOL, assert_close, randn

# ---------------------------------------------------------------------------------------------------------------
# Reference (fp64 eager)


def reference_parts(query, key, negatives=None, positive_ids=None, margin=None, normalize=True):
    """(similarity (M, C), positive (M, C), removed (M, C)) over the C = N + S or N + K candidates of each query."""
    m, n = query.shape[0], key.shape[0]
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    sim = query @ key.T
    if negatives is not None and negatives.dim() == 2:  # (S, d): the same rows for every query
        sim = torch.cat([sim, query @ negatives.T], dim=1)
    elif negatives is not None:  # (M, K, d): query i's own K rows
        sim = torch.cat([sim, torch.einsum("id,ikd->ik", query, negatives)], dim=1)
    ids = torch.arange(n) if positive_ids is None else positive_ids.cpu()
    positive = torch.zeros(sim.shape, dtype=torch.bool)
    positive[:, :n] = ids[:m, None] == ids[None, :]
    removed = torch.zeros_like(positive)
    if margin is not None:
        anchor = sim.detach()[torch.arange(m), torch.arange(m)]  # sim(q_i, k_i)
        removed = ~positive & (sim.detach() > anchor[:, None] - margin)
    return sim, positive, removed


def reference_info_nce(query, key, temperature, negatives=None, positive_ids=None, margin=None, normalize=True,
                       reduction="mean"):
    sim, positive, removed = reference_parts(query, key, negatives, positive_ids, margin, normalize)
    log_p = torch.log_softmax((sim / temperature).masked_fill(removed, -math.inf), dim=1)
    target = positive.to(sim.dtype) / positive.sum(dim=1, keepdim=True)
    losses = -torch.where(positive, target * log_p, 0.0).sum(dim=1)  # (0 * -inf of a removed candidate: NaN)
    return {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]


# ---------------------------------------------------------------------------------------------------------------
# The reference's own checks


def test_reference_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    q, k = randn(gen, 7, 5, dtype=torch.float64), randn(gen, 11, 5, dtype=torch.float64)
    for normalize in (True, False):
        qn, kn = (F.normalize(q, dim=1), F.normalize(k, dim=1)) if normalize else (q, k)
        expected = F.cross_entropy(qn @ kn.T / 0.3, torch.arange(7), reduction="none")
        assert_close(reference_info_nce(q, k, 0.3, normalize=normalize, reduction="none"), expected, torch.float64)
        # unique ids are the default one-hot target; a margin below every gap removes nothing
        assert_close(reference_info_nce(q, k, 0.3, positive_ids=torch.arange(11) * 3, margin=-10.0,
                                        normalize=normalize), expected.mean(), torch.float64)
    # per-query negatives that are the same K rows for every query are shared negatives
    neg = randn(gen, 3, 5, dtype=torch.float64)
    assert_close(reference_info_nce(q, k, 0.3, negatives=neg.expand(7, 3, 5)),
                 reference_info_nce(q, k, 0.3, negatives=neg), torch.float64)


E = math.e
# normalize=False, temperature 1: the dot products are exact small integers
HAND = {
    # logits rows [1, 0, 1], [0, 1, 0], [1, 0, 1]; ids [0, 1, 0]: rows 0 and 2 have the two positives keys 0 and 2,
    # -((1 - lse) + (1 - lse)) / 2 = log(2e + 1) - 1; row 1 the one positive key 1: log(e + 2) - 1
    "positive_ids": (dict(query=[[1, 0], [0, 1], [1, 0]], key=[[1, 0], [0, 1], [1, 0]], positive_ids=[0, 1, 0]),
                     [math.log(2 * E + 1) - 1, math.log(E + 2) - 1, math.log(2 * E + 1) - 1]),
    # logits rows [2, 0, 2], [0, 1, 1], [1, 1, 2]; thresholds sim_ii - 0.5 = 1.5, 0.5, 1.5: key 2 leaves row 0
    # (2 > 1.5) and row 1 (1 > 0.5); row 2 keeps keys 0 and 1 (1 < 1.5)
    "margin": (dict(query=[[2, 0], [0, 1], [1, 1]], key=[[1, 0], [0, 1], [1, 1]], margin=0.5),
               [math.log(1 + E ** -2), math.log(1 + E ** -1), math.log(1 + 2 / E)]),
    # the same with margin 0: a candidate equal to the positive (row 0 key 2, row 1 key 2) stays (strictly greater)
    "margin_0": (dict(query=[[2, 0], [0, 1], [1, 1]], key=[[1, 0], [0, 1], [1, 1]], margin=0.0),
                 [math.log(2 * E ** 2 + 1) - 2, math.log(1 + 2 * E) - 1, math.log(E ** 2 + 2 * E) - 2]),
}


def _hand_inputs(name, device="cpu"):
    kw, expected = HAND[name]
    kw = {k: torch.tensor(v, dtype=torch.int64 if k == "positive_ids" else torch.float64, device=device)
          if isinstance(v, list) else v for k, v in kw.items()}
    return kw, torch.tensor(expected, dtype=torch.float64)


@pytest.mark.parametrize("name", HAND)
def test_reference_hand_examples(name):
    kw, expected = _hand_inputs(name)
    assert_close(reference_info_nce(temperature=1.0, normalize=False, reduction="none", **kw), expected,
                 torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# info_nce against the reference


@pytest.fixture(params=["bands", "kernels"])
def schedule(tier, request, monkeypatch):
    """The retrieval engine of the Triton tiers (``FUSEDLOSS_RETRIEVAL_SCHEDULE``): the torch bands (the default)
    or the kernels (opt-in); the torch tier has one engine."""
    if tier.name == "torch" and request.param == "kernels":
        pytest.skip("the torch backend runs the torch bands whatever the schedule")
    monkeypatch.setenv("FUSEDLOSS_RETRIEVAL_SCHEDULE", request.param)
    return request.param


def _call(query, key, temperature, negatives=None, positive_ids=None, margin=None, **kw):
    return fusedloss.info_nce(query, key, temperature, negatives=negatives, positive_ids=positive_ids,
                              false_negative_margin=margin, **kw)


@pytest.mark.parametrize("name", HAND)
def test_hand_examples(tier, schedule, name):
    kw, expected = _hand_inputs(name, tier.device)
    loss = _call(temperature=1.0, normalize=False, reduction="none", **kw)
    assert_close(loss, expected, torch.float64, name)


def _leaf_copies(tested):
    """fp64 CPU leaves of the tested tensors' values (None and numbers stay as they are)."""
    return [t.detach().to(torch.float64).cpu().requires_grad_() if isinstance(t, torch.Tensor) else t
            for t in tested]


@torch.no_grad()
def _parts(tested, positive_ids, margin, normalize):
    """The reference's (similarity, positive, removed) for ``tested`` = [query, key, temperature, negatives]."""
    query, key, _, negatives = _leaf_copies(tested)
    return reference_parts(query, key, negatives, positive_ids, margin, normalize)


def _compare(tier, dtype, tested, kw, gen, reduction):
    """``tested`` = [query, key, temperature, negatives]: the loss and every gradient against the reference's on
    fp64 CPU copies, under a random grad_output."""
    ref = _leaf_copies(tested)
    out = _call(*tested[:3], negatives=tested[3], reduction=reduction, **kw)
    expected = reference_info_nce(*ref[:3], negatives=ref[3], reduction=reduction, **kw)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected, dtype, "loss")
    grad_out = randn(gen, *expected.shape, dtype=torch.float64)
    wanted = [i for i, t in enumerate(tested) if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(out, [tested[i] for i in wanted], grad_out.to(out.dtype).to(tier.device))
    want = torch.autograd.grad(expected, [ref[i] for i in wanted], grad_out)
    names = ["query", "key", "temperature", "negatives"]
    for i, g, w in zip(wanted, got, want):
        if i != 2:
            assert_close(g, w, dtype, f"{names[i]}.grad")
            continue
        # the temperature's gradient sums one term per row, of either sign (cancelling by 1000x at times): each term
        # to the tolerance, not their sum (the terms: the reference's gradient w.r.t. one temperature per row)
        t_rows = ref[2].detach().expand(len(ref[0]), 1).clone().requires_grad_()
        rows = reference_info_nce(ref[0], ref[1], t_rows, ref[3], reduction="none", **kw)
        weights = grad_out.expand(len(ref[0])) / (len(ref[0]) if reduction == "mean" else 1)
        terms = torch.autograd.grad(rows, t_rows, weights)[0]
        assert abs(float(g) - float(w)) <= TOL[dtype] * float(terms.abs().sum()), f"temperature.grad {g} != {w}"


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 16), extra=st.sampled_from([0, 0, 1, 5, 12]), dim=st.integers(2, 24),
       neg=st.sampled_from(["none", "shared", "per_query"]), count=st.integers(1, 7),
       id_range=st.sampled_from([None, 1, 2, 3, 5]), margin=st.none() | st.floats(-0.2, 0.5),
       normalize=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
       temperature=st.floats(0.05, 1.0), temperature_tensor=st.booleans(), seed=st.integers(0, 2**16))
def test_property_every_option(tier, schedule, m, extra, dim, neg, count, id_range, margin, normalize, reduction,
                               temperature, temperature_tensor, seed):
    if tier.name == "cuda":
        pytest.skip("the fp64 property tests run in the CPU tiers")
    gen, n = torch.Generator().manual_seed(seed), m + extra
    scale = 1.0 if normalize else dim ** -0.5  # raw dot products of O(1)
    make = lambda *shape: randn(gen, *shape, dtype=torch.float64, device=tier.device, scale=scale,
                                requires_grad=True)
    negatives = {"none": None, "shared": lambda: make(count, dim),
                 "per_query": lambda: make(m, min(count, 4), dim)}[neg]
    temp = torch.tensor(temperature, dtype=torch.float64, device=tier.device, requires_grad=True) \
        if temperature_tensor else temperature
    tested = [make(m, dim), make(n, dim), temp, negatives() if negatives else None]
    ids = None if id_range is None else torch.randint(id_range, (n,), generator=gen).to(tier.device)
    if margin is not None:  # no candidate at the threshold within rounding (measure zero, but derandomized draws)
        sim, positive, _ = _parts(tested, ids, margin, normalize)
        gap = (sim.diagonal()[:, None] - sim - margin).abs()[~positive]
        assume(gap.numel() == 0 or float(gap.min()) > 1e-9)
    with torch.no_grad():  # below 1e-4 the reference's own log-softmax cancels past 1e-10 (as test_contrastive's)
        total = float(reference_info_nce(*_leaf_copies(tested), ids, margin, normalize, reduction="sum"))
    assume(total == 0.0 or total > 1e-4)
    _compare(tier, torch.float64, tested, dict(positive_ids=ids, margin=margin, normalize=normalize), gen,
             reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("neg", ["shared", "per_query"])
@pytest.mark.parametrize("normalize", [True, False])
def test_low_precision_every_option(tier, schedule, gen, dtype, neg, normalize):
    """24 queries, 8 queue keys, 6 shared or 3 per-query negatives, ids with duplicates, a margin that removes the
    planted near-copies of every fourth query, a temperature tensor. Rows of norm ~1 (so that the dot products of
    normalize=False are O(1) too); the margin is placed where no candidate is within 0.02 of its threshold (a
    low-precision similarity must not flip a candidate)."""
    m, n, d = 24, 32, 24
    unit = lambda *shape: F.normalize(randn(gen, *shape, dtype=torch.float64), dim=-1)
    query = unit(m, d)
    key = torch.cat([query + 0.05 * unit(m, d), unit(n - m, d)])  # positives close to their queries
    negatives = unit(6, d) if neg == "shared" else unit(m, 3, d)
    planted = query[1::4] + 0.05 * unit(m // 4, d)  # as close to query 1, 5, 9, ... as its positive
    if neg == "shared":
        key[m:m + m // 4] = planted  # queue keys
    else:
        negatives[1::4, 0] = planted
    ids = (torch.arange(n) % 20).to(torch.int32)  # keys 20..31 share the ids of queries 0..11
    to = lambda x: x.to(dtype).to(tier.device).requires_grad_()
    temp = torch.tensor(0.2 if normalize else 1.0, device=tier.device, requires_grad=True)
    tested = [to(query), to(key), temp, to(negatives)]
    sim, positive, _ = _parts(tested, ids, None, normalize)
    gaps = (sim.diagonal()[:, None] - sim)[~positive]
    margin = max(torch.linspace(0.1, 0.3, 41).tolist(), key=lambda c: float((gaps - c).abs().min()))
    assert float((gaps - margin).abs().min()) > 0.02, "test data: a candidate at the margin's threshold"
    removed = _parts(tested, ids, margin, normalize)[2]
    assert removed.any() and (positive.sum(1) > 1).any()  # the margin and the duplicate ids both act
    _compare(tier, dtype, tested, dict(positive_ids=ids.to(tier.device), margin=margin, normalize=normalize), gen,
             "none")


@pytest.mark.parametrize("neg", ["shared", "per_query"])
def test_strided_inputs(tier, schedule, gen, neg):
    """Transposed and strided views (query, key, negatives, ids: every stride but the unit one) give the contiguous
    copies' loss and gradients, on both engines."""
    m, n, d = 9, 12, 7
    query_t = randn(gen, d, m, dtype=torch.float64, device=tier.device).requires_grad_()
    key_wide = randn(gen, n, 2 * d, dtype=torch.float64, device=tier.device).requires_grad_()
    negatives = randn(gen, *((5, d) if neg == "shared" else (m, 3, d)), dtype=torch.float64, device=tier.device)
    negatives = negatives.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()  # column-major rows
    ids_wide = torch.arange(2 * n, device=tier.device) // 4
    views = (query_t.T, key_wide[:, ::2], negatives, ids_wide[::2])
    copies = [t.detach().contiguous().requires_grad_(t.is_floating_point()) for t in views]
    leaves = [(query_t, key_wide, negatives), copies[:3]]
    results = []
    for (q, k, ng, ids), wrt in ((views, leaves[0]), (copies, leaves[1])):
        loss = _call(q, k, 0.1, negatives=ng, positive_ids=ids, margin=0.2)
        grads = torch.autograd.grad(loss, wrt)
        results.append([loss, grads[0].T if wrt is leaves[0] else grads[0],
                        grads[1][:, ::2] if wrt is leaves[0] else grads[1], grads[2]])
    for got, want, what in zip(results[0], results[1], ("loss", "query", "key", "negatives")):
        assert_close(got, want, torch.float64, what)


@pytest.mark.parametrize("normalize", [True, False])
def test_duplicate_keys_tie_at_margin_zero(tier, schedule, gen, normalize):
    """Keys repeated after the positives (duplicate passages, common in a batch) have exactly the positive's
    similarity: with GISTEmbed's default margin 0 the strict test keeps them, as the definition's one matmul does,
    in the forward and the backward of both engines (the anchor comes from the same products as the candidates')."""
    m, d = 8, 96
    size = 1.0 if normalize else 0.1  # (raw dot products of about unit size: the softmax not saturated)
    query = randn(gen, m, d, device=tier.device, scale=size, requires_grad=True)
    base = randn(gen, m, d, device=tier.device, scale=size)
    key = torch.cat([base, base]).requires_grad_()
    loss = _call(query, key, 0.05, margin=0.0, normalize=normalize, reduction="none")
    grads = torch.autograd.grad(loss, [query, key], torch.linspace(0.5, 1.5, m, device=tier.device))
    leaves = _leaf_copies([query, key])
    want = reference_info_nce(*leaves, 0.05, margin=0.0, normalize=normalize, reduction="none")
    assert not reference_parts(*leaves, margin=0.0, normalize=normalize)[2][:, m:].diagonal().any()  # kept
    want_grads = torch.autograd.grad(want, leaves, torch.linspace(0.5, 1.5, m, dtype=torch.float64))
    assert_close(loss, want, torch.float32, "loss")
    for got, expected, name in zip(grads, want_grads, ("query", "key")):
        assert_close(got, expected, torch.float32, f"{name}.grad")


@pytest.mark.parametrize("options", [{}, {"positive_ids": True}])
def test_subnormal_grad_output(tier, schedule, gen, options):
    """A grad_output below the smallest normal number (1e-310 in fp64) scales the gradients; the band kernels'
    1 / max|weight| scaling once made it inf and the gradients NaN (the plain call's kernels too)."""
    query = randn(gen, 10, 6, dtype=torch.float64, device=tier.device, requires_grad=True)
    key = randn(gen, 12, 6, dtype=torch.float64, device=tier.device, requires_grad=True)
    ids = torch.arange(12, device=tier.device) // 2 if options else None
    loss = _call(query, key, 0.1, positive_ids=ids, reduction="sum")
    tiny = torch.tensor(1e-310, dtype=torch.float64, device=tier.device)
    grads = torch.autograd.grad(loss, [query, key], tiny, retain_graph=True)
    ones = torch.autograd.grad(loss, [query, key])
    for got, unit, name in zip(grads, ones, ("query", "key")):
        assert torch.isfinite(got).all(), name
        assert_close(got / 1e-310, unit, torch.float64, f"{name}.grad", factor=1e3)  # (subnormals: ~13 digits)


def test_default_call_is_cross_entropy(tier, gen):
    """No new option (omitted or None): F.cross_entropy over the cosine logits, queue keys included."""
    q = randn(gen, 20, 16, device=tier.device, requires_grad=True)
    k = randn(gen, 27, 16, device=tier.device, requires_grad=True)
    logits = F.normalize(q.double(), dim=1) @ F.normalize(k.double(), dim=1).T / 0.07
    expected = F.cross_entropy(logits, torch.arange(20, device=tier.device))
    want = torch.autograd.grad(expected, (q, k), retain_graph=True)
    for loss in (fusedloss.info_nce(q, k), _call(q, k, 0.07)):
        assert_close(loss, expected, torch.float32, "loss")
        got = torch.autograd.grad(loss, (q, k))
        assert_close(got[0], want[0], torch.float32, "query.grad")
        assert_close(got[1], want[1], torch.float32, "key.grad")


def _bad_calls():
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    ids = torch.arange(6)
    return [
        (dict(negatives=torch.randn(3, 5)), "negatives"),  # feature size
        (dict(negatives=torch.randn(8)), "negatives"),  # 1-D
        (dict(negatives=torch.randn(4, 2, 3, 8)), "negatives"),  # 4-D
        (dict(negatives=torch.randn(5, 2, 8)), "negatives"),  # (M, K, d) with M + 1 rows
        (dict(negatives=torch.randn(4, 2, 5)), "negatives"),  # (M, K, d) feature size
        (dict(positive_ids=ids[:4]), "positive_ids"),  # (M,), not (N,)
        (dict(positive_ids=ids[:, None]), "positive_ids"),  # (N, 1)
        (dict(positive_ids=ids.float()), "positive_ids"),  # not integer
        (dict(false_negative_margin=math.nan), "false_negative_margin"),
        (dict(false_negative_margin=math.inf), "false_negative_margin"),
        (dict(false_negative_margin=-math.inf), "false_negative_margin"),
        (dict(false_negative_margin="0.1"), "false_negative_margin"),
        (dict(dist_impl="all_gather"), "dist_impl"),
    ], q, k


@pytest.mark.parametrize("case", range(len(_bad_calls()[0])))
def test_bad_input_names_the_argument(case):
    # (without this, "unexpected keyword argument 'negatives'" would pass for a missing implementation)
    assert "negatives" in inspect.signature(fusedloss.info_nce).parameters
    calls, q, k = _bad_calls()
    kw, name = calls[case]
    with pytest.raises((ValueError, TypeError), match=name):
        fusedloss.info_nce(q, k, 0.1, **kw)
