"""approximation="release": the ADPA authors' released formulas (DCKD's top-k KL, ADPA's top-k
advantage, their clamps), against an independent float64 implementation written here in the
release's own style (softmax, torch.topk, gather, clamps, sums; a per-row dictionary for the
reference's top-k, as the release stores it), with autograd. Every backend that computes the release
must equal it: gradients to 1e-10 (float64), per-row values to 1e-10 beyond the API's float32
rounding of its outputs. The inputs are built so the clamps are active, and the tests check they are."""
import os

import pytest
import torch

from fastdadpo.commands.config import load_config
from fastdadpo.commands.recipe import load_recipe
from fastdadpo.core.batch import Batch
from fastdadpo.core.objectives import OBJECTIVES, ParameterError
from fastdadpo.core.step import Head, StepInputs
from fastdadpo.kernels import fused_linear_advantage, fused_linear_divergence
from kernel_grads import run_with_grads
from test_objectives import VOCAB, _normalizers, _problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-8  # the release's clamp
LOG_FLOOR = 1e-7  # the release's floor before the advantage's logs
BACKENDS = ("torch", "chunked", "naive")  # those that compute the release on CPU
V, HS, HT, TEACHER_PAD = 64, 12, 10, 7
SPIKE = 45.0  # a teacher logit this far above the rest: its probability > 1 − ε


# --- the release's formulas, independently ---------------------------------------------------------------

def _clamp(x):
    return torch.clamp(x, EPS, 1 - EPS)


def _probs(hidden, weight, temperature):
    return torch.softmax((hidden @ weight[:V].T) / temperature, dim=-1)


def release_kl(p, q, top_k):
    """Σ over the teacher's top-k tokens and the rest bin of q̃·(log q̃ − log p̃), both clamped."""
    q_top, idx = torch.topk(q, min(top_k, q.shape[-1]), dim=-1)
    p_top = torch.gather(p, -1, idx)
    qq = _clamp(torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1))
    pp = _clamp(torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1))
    return (qq * torch.log(qq) - qq * torch.log(pp)).sum(-1)


def release_ref_at_top(q, r, top_k):
    """The reference's probability at each of the teacher's top-k tokens as the release fills it: from
    the reference's own top-k (a token → probability dictionary per position), else the smallest of the
    teacher's top-k probabilities. Returns it and whether each token was in the reference's top-k."""
    k = min(top_k, q.shape[-1])
    q_top, idx = torch.topk(q, k, dim=-1)
    r_top, r_idx = torch.topk(r, k, dim=-1)
    filled, found = torch.empty_like(q_top), torch.zeros_like(q_top, dtype=torch.bool)
    for row in range(q.shape[0]):
        kept = dict(zip(r_idx[row].tolist(), r_top[row].tolist()))
        floor = q_top[row].min().item()
        for j, token in enumerate(idx[row].tolist()):
            found[row, j] = token in kept
            filled[row, j] = kept.get(token, floor)
    return filled, found


def release_raw_advantage(q, r, top_k):
    q_top, _ = torch.topk(q, min(top_k, q.shape[-1]), dim=-1)
    ref_at, _ = release_ref_at_top(q, r, top_k)
    return torch.log(torch.clamp(q_top, min=LOG_FLOOR) / torch.clamp(ref_at, min=LOG_FLOOR))


def release_advantage(p, q, r, top_k):
    """Σ_K clamp(p)·clamp(A) + clamp(1 − Σ_K p)·ε, A = log(max(q, 1e-7)/max(r̃, 1e-7))."""
    _, idx = torch.topk(q, min(top_k, q.shape[-1]), dim=-1)
    adv = _clamp(release_raw_advantage(q, r, top_k))
    p_top = torch.gather(p, -1, idx)
    s = _clamp(torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1))
    target = torch.cat([adv, torch.full_like(adv[:, :1], EPS)], -1)
    return (s * target).sum(-1)


# --- inputs that hit the clamps ----------------------------------------------------------------------------

def _exact32(t):
    """Float64 values a float32 holds exactly: row weights and upstream gradients pass through float32."""
    return t.float().double()


def _problem_rows(lead, seed):
    """Student, teacher (head padded past V), reference. One row in four has a teacher logit spike
    (a probability above 1 − ε, its rest below ε), one in five a sharp student (probabilities below ε)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(lead).prod())

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    rows = torch.arange(n)
    student_h, teacher_h, ref_h = randn(n, HS), randn(n, HT), randn(n, HT)
    student_w, teacher_w, ref_w = randn(V, HS, std=0.7), randn(V + TEACHER_PAD, HT, std=0.9), randn(V, HT, std=0.9)
    # The spike: one more hidden unit, reaching one token of the teacher's head only.
    teacher_h = torch.cat([teacher_h, (rows % 4 == 0).double().unsqueeze(1) * SPIKE], 1)
    spike = torch.zeros(V + TEACHER_PAD, 1, dtype=torch.float64)
    spike[3] = 1.0
    teacher_w = torch.cat([teacher_w, spike], 1)
    student_h = student_h * torch.where(rows % 5 == 0, 12.0, 1.0).double().unsqueeze(1)
    ref_h = torch.cat([ref_h, torch.zeros(n, 1, dtype=torch.float64)], 1)
    ref_w = torch.cat([ref_w, torch.zeros(V, 1, dtype=torch.float64)], 1)
    shape = tuple(lead)
    return dict(student_hidden=student_h.reshape(*shape, HS), student_weight=student_w,
                teacher_hidden=teacher_h.reshape(*shape, HT + 1), teacher_weight=teacher_w,
                ref_hidden=ref_h.reshape(*shape, HT + 1), ref_weight=ref_w,
                mask=(torch.rand(shape, generator=g) < 0.75), targets=torch.randint(0, V, shape, generator=g),
                upstream=_exact32(randn(*shape)), weights=_exact32(randn(*shape) * 0.1))


def _distributions(prob, student_hidden, student_weight, temperature):
    flat = {k: prob[k].reshape(-1, prob[k].shape[-1]) for k in ("teacher_hidden", "ref_hidden")}
    return (_probs(student_hidden.reshape(-1, HS), student_weight, temperature),
            _probs(flat["teacher_hidden"], prob["teacher_weight"], temperature),
            _probs(flat["ref_hidden"], prob["ref_weight"], temperature))


def _assert_clamps_hit(prob, temperature, top_k, advantage):
    """The inputs really exercise the clamps (else the comparison could not see them wrong)."""
    with torch.no_grad():
        p, q, r = _distributions(prob, prob["student_hidden"], prob["student_weight"], temperature)
        q_top, idx = torch.topk(q, min(top_k, V), dim=-1)
        p_top = torch.gather(p, -1, idx)
        assert (q_top > 1 - EPS).any(), "no teacher probability above 1 − ε"
        assert (p_top < EPS).any(), "no student probability below ε"
        if top_k < V:
            assert (1 - q_top.sum(-1) < EPS).any() and (1 - q_top.sum(-1) > EPS).any(), "teacher rest bin"
        if advantage:
            raw = release_raw_advantage(q, r, top_k)
            # (top_k 1: the reference's top token is rarely the teacher's, and then A = log(q/min_K q) = 0.)
            assert (raw < EPS).any() and (top_k == 1 or (raw > 1 - EPS).any()), "advantages below 0 and above 1"
            assert top_k == 1 or ((raw > EPS) & (raw < 1 - EPS)).any()
            if 1 < top_k < V:
                _, found = release_ref_at_top(q, r, top_k)
                assert found.any() and not found.all(), "the reference's top-k fill is not exercised"


# --- the kernels against the formulas ----------------------------------------------------------------------

def _reference(kind, prob, temperature, top_k, reduced, with_targets=False, logp_temperature=None):
    """Per-row values and the gradients of hidden and weight, float64 autograd."""
    hidden = prob["student_hidden"].clone().requires_grad_()
    weight = prob["student_weight"].clone().requires_grad_()
    p, q, r = _distributions(prob, hidden, weight, temperature)
    values = release_advantage(p, q, r, top_k) if kind == "advantage" else release_kl(p, q, top_k)
    mask = prob["mask"].reshape(-1)
    values = torch.where(mask, values, torch.zeros_like(values))
    row_weights = (prob["weights"] if reduced else prob["upstream"]).reshape(-1)
    loss = (values * row_weights).sum()
    if with_targets:  # the cross-entropy term: exact log-softmax over the whole student head
        logps = torch.log_softmax(hidden.reshape(-1, HS) @ weight.T / logp_temperature, -1)
        picked = logps.gather(-1, prob["targets"].reshape(-1, 1)).squeeze(-1)
        loss = loss - (picked * prob["weights"].reshape(-1)).sum()
    loss.backward()
    return values.detach(), loss.detach(), hidden.grad, weight.grad


def _call(kind, impl, prob, temperature, top_k, reduced, with_targets=False, logp_temperature=1.0, **options):
    def fn(hidden, weight):
        common = dict(temperature=temperature, mask=prob["mask"], vocab_size=V, impl=impl,
                      approximation="release", top_k=top_k, weights=prob["weights"] if reduced else None, **options)
        if kind == "advantage":
            return fused_linear_advantage(hidden, weight, prob["teacher_hidden"], prob["teacher_weight"],
                                          prob["ref_hidden"], prob["ref_weight"], **common)
        extra = dict(targets=prob["targets"], logp_temperature=logp_temperature,
                     logp_weights=-prob["weights"]) if with_targets else {}
        return fused_linear_divergence(hidden, weight, prob["teacher_hidden"], prob["teacher_weight"],
                                       kind="forward_kl", **common, **extra)
    return fn


def _check_values(ours, expected):
    """float64 to 1e-10, after the API's float32 rounding of its per-row outputs."""
    diff = (ours.double().reshape(-1) - expected).abs()
    assert bool((diff <= 1e-10 + expected.abs() * 2.0 ** -24).all()), f"values: max |diff| {diff.max():.3g}"


def _check_grads(ours, expected):
    for name, mine, theirs in zip(("d hidden", "d weight"), ours, expected):
        diff = (mine.double() - theirs.reshape(mine.shape)).abs().max()
        assert diff <= 1e-10, f"{name}: max |diff| {diff:.3g}"


CASES = [(lead, temperature, top_k) for lead, temperature in (((37,), 1.0), ((5, 14), 1.7)) for top_k in (1, 5, 50)]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("kind", ["advantage", "forward_kl"])
@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "per-row"])
@pytest.mark.parametrize("lead,temperature,top_k", CASES, ids=[f"{c[0]}-T{c[1]}-k{c[2]}" for c in CASES])
def test_release_equals_the_formulas(impl, kind, reduced, lead, temperature, top_k):
    prob = _problem_rows(lead, seed=top_k + len(lead))
    _assert_clamps_hit(prob, temperature, top_k, advantage=kind == "advantage")
    values, loss, *grads = _reference(kind, prob, temperature, top_k, reduced)
    leaves = [prob["student_hidden"], prob["student_weight"]]
    # A small budget: several row chunks (and row blocks of 32 within them) for the chunked backend.
    options = dict(chunk_budget_mb=0.01) if impl == "chunked" else {}
    outs, ours = run_with_grads(_call(kind, impl, prob, temperature, top_k, reduced, **options), leaves,
                                [prob["upstream"]], torch.float64)
    _check_values(outs[0], values)
    _check_grads(ours, grads)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("student_rows,logp_temperature", [(V, 1.3), (V + 5, 1.3), (V, 1.0)],
                         ids=["shared-normalizer", "wider-student-head", "other-logp-temperature"])
def test_release_kl_with_cross_entropy_from_the_same_sweep(impl, student_rows, logp_temperature):
    """DCKD's call: the release's KL and the cross-entropy, reduced together; one student softmax for
    both where the head is the vocabulary and the temperatures agree."""
    prob = _problem_rows((70,), seed=11)
    extra = torch.randn(student_rows - V, HS, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    prob["student_weight"] = torch.cat([prob["student_weight"], extra])
    _assert_clamps_hit(prob, 1.3, 5, advantage=False)
    values, loss, *grads = _reference("forward_kl", prob, 1.3, 5, True, with_targets=True,
                                      logp_temperature=logp_temperature)
    fn = _call("forward_kl", impl, prob, 1.3, 5, True, with_targets=True, logp_temperature=logp_temperature)
    outs, ours = run_with_grads(fn, [prob["student_hidden"], prob["student_weight"]], [None, None], torch.float64)
    _check_values(outs[0], values)
    _check_grads(ours, grads)


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    prob = _problem_rows((37,), seed=2)
    for kind in ("advantage", "forward_kl"):
        whole = _call(kind, "torch", prob, 1.0, V, True)(prob["student_hidden"], prob["student_weight"])
        beyond = _call(kind, "torch", prob, 1.0, 10 * V, True)(prob["student_hidden"], prob["student_weight"])
        torch.testing.assert_close(beyond.values, whole.values, rtol=0, atol=0)
        values = _reference(kind, prob, 1.0, 10 * V, True)[0]
        _check_values(beyond.values, values)


def test_exact_is_not_the_release():
    """The default stays the full-vocabulary formula (the existing kernel tests cover its values)."""
    prob = _problem_rows((37,), seed=4)
    args = (prob["student_hidden"], prob["student_weight"], prob["teacher_hidden"], prob["teacher_weight"])
    exact = fused_linear_divergence(*args, vocab_size=V, impl="torch")
    release = fused_linear_divergence(*args, vocab_size=V, impl="torch", approximation="release", top_k=5)
    assert not torch.allclose(exact, release)


# --- refusals, and the backends that route around the Triton row kernel -------------------------------------

def test_the_tile_fused_backend_refuses_the_release(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the CUDA check, to the capability one
    prob = _problem_rows((37,), seed=0)
    with pytest.raises(ValueError) as raised:
        _call("advantage", "triton", prob, 1.0, 5, True)(prob["student_hidden"], prob["student_weight"])
    message = str(raised.value)
    assert "the triton kernel backend does not compute approximation='release'" in message
    assert "chunked, chunked_triton, torch, naive backends do" in message and "\n" not in message


@pytest.mark.parametrize("call, message", [
    (dict(approximation="approx"), "unknown approximation 'approx'; choose one of exact, release"),
    (dict(approximation="release", top_k=0), "top_k must be a positive integer, got 0"),
    (dict(approximation="release", top_k=5.0), "top_k must be a positive integer, got 5.0"),
    (dict(top_k=5), "top_k=5 applies to approximation='release' only"),
    (dict(approximation="release", kind="jsd"), "approximation='release' is defined for kind='forward_kl' only"),
    (dict(approximation="release", kind="reverse_kl"), "not kind='reverse_kl'"),
])
def test_bad_release_arguments_are_refused(call, message):
    prob = _problem_rows((8,), seed=0)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fused_linear_divergence(prob["student_hidden"], prob["student_weight"], prob["teacher_hidden"],
                                prob["teacher_weight"], vocab_size=V, impl="torch", **call)


def test_chunked_triton_takes_the_torch_rows_for_the_release(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prob = _problem_rows((37,), seed=5)
    for kind in ("advantage", "forward_kl"):
        leaves = [prob["student_hidden"], prob["student_weight"]]
        expected = run_with_grads(_call(kind, "torch", prob, 1.0, 5, False), leaves, [prob["upstream"]],
                                  torch.float64)
        ours = run_with_grads(_call(kind, "chunked_triton", prob, 1.0, 5, False), leaves, [prob["upstream"]],
                              torch.float64)
        torch.testing.assert_close(ours[0][0], expected[0][0], rtol=0, atol=0)
        for mine, theirs in zip(ours[1], expected[1]):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)


# --- the objectives -----------------------------------------------------------------------------------------

def _objective64(objective, p):
    """An objective on the test_objectives problem in float64; returns its output and leaf grads."""
    hidden = p["student_hidden"].clone().requires_grad_()
    weight = p["student_weight"].clone().requires_grad_()
    targets, seq = p["targets"], p["target_sequence"]
    batch = Batch(input_ids=torch.zeros_like(targets), attention_mask=None, position_ids=torch.zeros_like(targets),
                  targets=targets, target_sequence=seq, example_index=torch.arange(p["num_pairs"]),
                  has_rejected=True, response_tokens=torch.bincount(seq[seq >= 0], minlength=p["num_sequences"]))
    inputs = StepInputs(student=Head(hidden, weight), batch=batch, normalizers=_normalizers(p), vocab_size=VOCAB,
                        teacher=Head(p["teacher_hidden"], p["teacher_weight"]),
                        teacher_reference=Head(p["ref_hidden"], p["ref_weight"]),
                        reference_logps=p["reference_logps"], teacher_logps=p["teacher_logps"])
    out = objective(inputs)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def _objective_reference(name, params, p, hidden, weight):
    """sft plus the release's DCKD or ADPA term, from the formulas above (vocabulary VOCAB)."""
    temperature = params.get("temperature", 1.0)
    seq = p["target_sequence"]
    chosen, rejected = (seq >= 0) & (seq < p["num_pairs"]), seq >= p["num_pairs"]

    def probs(h, w):
        return torch.softmax(h @ w[:VOCAB].T / temperature, -1)

    logps = torch.log_softmax(hidden @ weight.T, -1).gather(-1, p["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    sft = -logps[chosen].mean()
    student, teacher = probs(hidden, weight), probs(p["teacher_hidden"], p["teacher_weight"])
    top_k = params["top_k"]
    if name == "dckd":
        div = _flat_apply(release_kl, top_k, student, teacher)
        return sft + params["lambda_chosen"] * div[chosen].mean() + params["lambda_rejected"] * div[rejected].mean()
    adv = _flat_apply(release_advantage, top_k, student, teacher, probs(p["ref_hidden"], p["ref_weight"]))
    return sft - params["gamma"] * adv[rejected].mean()


def _flat_apply(formula, top_k, *distributions):
    """A row formula over distributions of any leading shape."""
    lead, vocab = distributions[0].shape[:-1], distributions[0].shape[-1]
    return formula(*(d.reshape(-1, vocab) for d in distributions), top_k).reshape(lead)


OBJECTIVE_CASES = [("dckd", dict(lambda_chosen=0.1, lambda_rejected=0.3, top_k=5)),
                   ("dckd", dict(lambda_chosen=0.2, lambda_rejected=0.1, top_k=50, temperature=1.5)),
                   ("adpa", dict(gamma=1.6, top_k=5)), ("adpa", dict(gamma=0.7, top_k=50, temperature=1.8))]


@pytest.mark.parametrize("name,params", OBJECTIVE_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OBJECTIVE_CASES)])
def test_objectives_with_the_release_equal_the_formulas(name, params):
    objective = OBJECTIVES[name](approximation="release", **params)
    p = _problem(pairs=3, seed=7)
    out, grad_hidden, grad_weight = _objective64(objective, p)
    hidden = p["student_hidden"].clone().requires_grad_()
    weight = p["student_weight"].clone().requires_grad_()
    expected = _objective_reference(name, {"temperature": 1.0, **params}, p, hidden, weight)
    expected.backward()
    # The loss is float32 and the row weights λ/n pass through float32: float32-relative tolerances.
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-6, atol=1e-7)
    for ours, theirs in ((grad_hidden, hidden.grad), (grad_weight, weight.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7 * float(theirs.abs().max()))
    exact = OBJECTIVES[name](**{k: v for k, v in params.items() if k != "top_k"})
    gap = abs(float(_objective64(exact, p)[0].loss.detach()) - float(out.loss.detach()))
    # The release is its own loss, except DCKD's KL over a whole vocabulary no clamp touches (top_k ≥ V).
    assert gap > 1e-6 if name == "adpa" or params["top_k"] < VOCAB else gap < 1e-6


@pytest.mark.parametrize("name,params,key", [
    ("dckd", dict(approximation="approx"), "approximation"),
    ("adpa", dict(approximation="Release"), "approximation"),
    ("dckd", dict(approximation="release", kind="jsd"), "approximation"),
    ("dckd", dict(approximation="release", kind="reverse_kl"), "approximation"),
    ("adpa", dict(approximation="release", top_k=0), "top_k"),
    ("adpa", dict(approximation="release", top_k=True), "top_k"),
    ("dckd", dict(approximation="release", top_k=2.5), "top_k"),
    ("adpa", dict(top_k=20), "top_k"),  # top_k applies to the release only
    ("dckd", dict(top_k=20), "top_k"),
])
def test_bad_release_parameters_name_the_parameter(name, params, key):
    with pytest.raises(ParameterError) as error:
        OBJECTIVES[name](**params)
    assert error.value.key == key


# --- the shipped configs ------------------------------------------------------------------------------------

def test_the_adpa_plus_recipe_trains_as_released():
    recipe = load_recipe(os.path.join(REPO, "configs", "recipes", "adpa-plus.yaml"))
    nproc = int(recipe.launcher.split("--nproc_per_node=")[1].split()[0])
    configs = {name: recipe.training_config(name, overrides, student)
               for name, overrides, student in recipe.trainings()}
    for name in ("DCKD", "ADPA", "ADPA+"):
        objective, train = configs[name]["objective"], configs[name]["train"]
        assert objective["approximation"] == "release" and objective["top_k"] == 50, name
        assert train["micro_batch_size"] * train["grad_accum"] * nproc == 128, name


@pytest.mark.parametrize("stage", ["adpa-plus-dckd.yaml", "adpa-plus-adpa.yaml"])
def test_the_adpa_plus_stage_configs_train_as_released(stage):
    config = load_config(os.path.join(REPO, "configs", stage))
    assert config.objective.approximation == "release" and config.objective.top_k == 50
    gpus = 8  # the release's batch on the recipe's 8 GPUs (the configs' comments say so)
    assert config.train.micro_batch_size * config.train.grad_accum * gpus == 128
