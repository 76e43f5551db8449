"""Objectives against references written from their formulas (the README's objective table) on
materialized float64 logits: the loss,
every metric, and the gradients on the student's hidden states and LM head, at irregular shapes with
padding on both sides of prompts and responses and a padded teacher vocabulary."""
import math
import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastdadpo.core.batch import Batch
from fastdadpo.core.losses import dadpo_loss, dpo_loss, sequence_logps
from fastdadpo.core.objectives import DPO, DaDPO, KD, OBJECTIVES, ParameterError, objective_table
from fastdadpo.core.step import Head, Normalizers, StepInputs

VOCAB, STUDENT_ROWS, TEACHER_ROWS = 41, 41, 47  # the teacher head is padded past the shared vocabulary
HS, HT = 12, 20


def _layout(pairs, seed, with_rejected=True):
    """Rows of [left pad | prompt | response | right pad] with random lengths, as data.collate lays
    them out: chosen sequences 0..B-1, rejected B..2B-1."""
    g = torch.Generator().manual_seed(seed)
    sequences = 2 * pairs if with_rejected else pairs
    width = 19
    targets = torch.full((sequences, width), -100)
    target_sequence = torch.full((sequences, width), -1)
    for s in range(sequences):
        left = int(torch.randint(0, 3, (1,), generator=g))
        prompt = int(torch.randint(2, 6, (1,), generator=g))
        response = int(torch.randint(1, width - left - prompt, (1,), generator=g))
        # hidden state at position p predicts token p+1: the response's tokens are predicted from
        # positions left+prompt-1 ... left+prompt+response-2
        start = left + prompt - 1
        targets[s, start:start + response] = torch.randint(0, VOCAB, (response,), generator=g)
        target_sequence[s, start:start + response] = s
    return targets, target_sequence


def _problem(pairs=3, seed=0, with_rejected=True):
    g = torch.Generator().manual_seed(seed + 100)
    targets, target_sequence = _layout(pairs, seed, with_rejected)
    rows, width = targets.shape

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    return dict(
        targets=targets, target_sequence=target_sequence, num_pairs=pairs, num_sequences=rows,
        student_hidden=randn(rows, width, HS), student_weight=randn(STUDENT_ROWS, HS, std=0.5),
        teacher_hidden=randn(rows, width, HT), teacher_weight=randn(TEACHER_ROWS, HT, std=0.4),
        ref_hidden=randn(rows, width, HT), ref_weight=randn(TEACHER_ROWS, HT, std=0.4),
        reference_logps=randn(rows, std=3.0) - 20.0, teacher_logps=randn(rows, std=3.0) - 18.0,
    )


def _normalizers(p):
    seq = p["target_sequence"]
    b = p["num_pairs"]
    return Normalizers(pairs=float(b), chosen_tokens=float(((seq >= 0) & (seq < b)).sum()),
                       rejected_tokens=float((seq >= b).sum()))


def _fused(objective, p, normalizers=None, rows=slice(None)):
    """Run an objective in float32 on (a row slice of) the problem; returns output and leaf grads."""
    hidden = p["student_hidden"][rows].float().clone().requires_grad_()
    weight = p["student_weight"].float().clone().requires_grad_()
    targets, seq = p["targets"][rows], p["target_sequence"][rows]
    batch = Batch(input_ids=torch.zeros_like(targets), attention_mask=None, position_ids=torch.zeros_like(targets),
                  targets=targets, target_sequence=seq, example_index=torch.arange(p["num_pairs"]),
                  has_rejected=p["num_sequences"] == 2 * p["num_pairs"],
                  response_tokens=torch.bincount(seq[seq >= 0], minlength=p["num_sequences"]))
    inputs = StepInputs(
        student=Head(hidden, weight), batch=batch, normalizers=normalizers or _normalizers(p), vocab_size=VOCAB,
        teacher=Head(p["teacher_hidden"][rows].float(), p["teacher_weight"].float()),
        teacher_reference=Head(p["ref_hidden"][rows].float(), p["ref_weight"].float()),
        reference_logps=p["reference_logps"].float(), teacher_logps=p["teacher_logps"].float())
    out = objective(inputs)
    out.loss.backward()
    return out, hidden.grad, weight.grad


# --- float64 references, written from the formulas ---------------------------------------------------------

def _log_softmax(hidden, weight, rows=None, temperature=1.0):
    weight = weight if rows is None else weight[:rows]
    return torch.log_softmax(hidden @ weight.T / temperature, dim=-1)


def _divergence(log_p, log_q, kind, beta):
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return (q * (log_q - log_p)).sum(-1)
    if kind == "reverse_kl":
        return (p * (log_p - log_q)).sum(-1)
    m = beta * q + (1 - beta) * p
    return beta * (q * (log_q - m.log())).sum(-1) + (1 - beta) * (p * (log_p - m.log())).sum(-1)


class Reference:
    def __init__(self, p, hidden, weight):
        self.p, self.hidden, self.weight = p, hidden, weight
        seq = p["target_sequence"]
        self.chosen = (seq >= 0) & (seq < p["num_pairs"])
        self.rejected = seq >= p["num_pairs"]
        self.responses = seq >= 0
        log_probs = _log_softmax(hidden, weight)
        picked = log_probs.gather(-1, p["targets"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        self.token_logps = torch.where(self.responses, picked, torch.zeros_like(picked))
        self.sequence = torch.zeros(p["num_sequences"], dtype=torch.float64).index_add(
            0, seq[self.responses], self.token_logps[self.responses])

    def divergence(self, kind="forward_kl", beta=0.5, temperature=1.0):
        log_p = _log_softmax(self.hidden, self.weight, VOCAB, temperature)
        log_q = _log_softmax(self.p["teacher_hidden"], self.p["teacher_weight"], VOCAB, temperature)
        return _divergence(log_p, log_q, kind, beta)

    def advantage(self, temperature=1.0):
        log_p = _log_softmax(self.hidden, self.weight, VOCAB, temperature)
        log_t = _log_softmax(self.p["teacher_hidden"], self.p["teacher_weight"], VOCAB, temperature)
        log_r = _log_softmax(self.p["ref_hidden"], self.p["ref_weight"], VOCAB, temperature)
        return (log_p.exp() * (log_t - log_r)).sum(-1)

    def token_mean(self, values, rows):
        return values[rows].sum() / rows.sum()

    def pairs(self, values):
        b = self.p["num_pairs"]
        return values[:b], values[b:]


def reference_loss(name, params, p, hidden, weight):
    """(loss, metrics) of objective ``name`` from its formula, written independently of the fused code."""
    r = Reference(p, hidden, weight)
    b = p["num_pairs"]
    sft = -r.token_mean(r.token_logps, r.chosen)
    metrics = {"logps/chosen": r.sequence[:b].mean()}
    if name == "sft":
        return sft, metrics
    if name == "kd":
        kd = r.token_mean(r.divergence(params["kind"], params.get("jsd_beta", 0.5), params["temperature"]), r.chosen)
        metrics.update({"kd/divergence": kd, "sft/ce": sft})
        return kd + params["ce_weight"] * sft, metrics
    if name == "dckd":
        div = r.divergence()
        kl_c, kl_r = r.token_mean(div, r.chosen), r.token_mean(div, r.rejected)
        metrics.update({"sft/ce": sft, "kd/divergence_chosen": kl_c, "kd/divergence_rejected": kl_r,
                        "kd/divergence": r.token_mean(div, r.responses)})
        return sft + params["lambda_chosen"] * kl_c + params["lambda_rejected"] * kl_r, metrics
    if name == "adpa":
        adv = r.token_mean(r.advantage(params["temperature"]), r.rejected)
        metrics.update({"sft/ce": sft, "adpa/advantage": adv})
        return sft - params["gamma"] * adv, metrics
    # the preference objectives
    policy_c, policy_r = r.pairs(r.sequence)
    ref_c, ref_r = r.pairs(p["reference_logps"])
    te_c, te_r = r.pairs(p["teacher_logps"])
    if name == "dadpo":
        b1, b2 = params["beta1"], params["beta2"]
        z = (b1 + b2) * (policy_c - policy_r) - b1 * (ref_c - ref_r) - b2 * (te_c - te_r)
        loss = -F.logsigmoid(z).mean()
        reward_c = (b1 + b2) * policy_c - b1 * ref_c - b2 * te_c
        reward_r = (b1 + b2) * policy_r - b1 * ref_r - b2 * te_r
    else:
        beta, eps = params["beta"], params.get("label_smoothing", 0.0)
        h = (policy_c - ref_c) - (policy_r - ref_r)
        loss_type = params.get("loss_type", "sigmoid")
        if loss_type == "sigmoid":
            loss = (-(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()
        elif loss_type == "ipo":
            loss = ((h - 1 / (2 * beta)) ** 2).mean()
        elif loss_type == "robust":  # TRL 1.16's formulas, written out
            loss = ((-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)).mean()
        elif loss_type == "exo_pair":
            q_w, q_l = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
            loss = (q_w * (torch.log(q_w) - math.log(1 - eps)) + q_l * (torch.log(q_l) - math.log(eps))).mean()
        elif loss_type == "discopop":
            m = torch.sigmoid(beta * h / 0.05)
            loss = (-F.logsigmoid(beta * h) * (1 - m) + torch.exp(-beta * h) * m).mean()
        else:
            loss = torch.relu(1 - beta * h).mean()
        reward_c, reward_r = beta * (policy_c - ref_c), beta * (policy_r - ref_r)
    metrics.update({"rewards/chosen": reward_c.mean(), "rewards/rejected": reward_r.mean(),
                    "rewards/margin": (reward_c - reward_r).mean(),
                    "rewards/accuracy": (reward_c > reward_r).double().mean(),
                    "logps/rejected": policy_r.mean()})
    if name == "dadpo_token":
        kd = r.token_mean(r.divergence(params["kind"], 0.5, params["temperature"]), r.responses)
        metrics["kd/divergence"] = kd
        loss = loss + params["alpha"] * kd
    return loss, metrics


CASES = [
    ("sft", {}),
    ("kd", dict(kind="forward_kl", temperature=1.0, ce_weight=0.0)),
    ("kd", dict(kind="jsd", jsd_beta=0.3, temperature=2.0, ce_weight=0.5)),
    ("kd", dict(kind="reverse_kl", temperature=1.5, ce_weight=0.2)),
    ("dpo", dict(beta=0.1)),
    ("dpo", dict(beta=0.3, label_smoothing=0.2)),
    ("dpo", dict(beta=0.5, loss_type="ipo")),
    ("dpo", dict(beta=0.2, loss_type="hinge")),
    ("dpo", dict(beta=0.3, loss_type="robust", label_smoothing=0.1)),
    ("dpo", dict(beta=0.05, loss_type="exo_pair", label_smoothing=0.1)),
    ("dpo", dict(beta=0.4, loss_type="discopop")),
    ("dadpo", dict(beta1=0.1, beta2=0.2)),
    ("dadpo_token", dict(beta=0.1, alpha=0.5, kind="forward_kl", temperature=1.0)),
    ("dadpo_token", dict(beta=0.2, alpha=0.1, kind="reverse_kl", temperature=2.0)),
    ("dckd", dict(lambda_chosen=0.1, lambda_rejected=0.3)),
    ("adpa", dict(gamma=1.6, temperature=1.0)),
    ("adpa", dict(gamma=0.7, temperature=1.8)),
]


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_objective_matches_reference(name, params):
    objective = OBJECTIVES[name](**params)
    p = _problem(pairs=3, seed=zlib.crc32(name.encode()) % 1000, with_rejected=objective.needs().uses_rejected)
    out, grad_hidden, grad_weight = _fused(objective, p)

    hidden = p["student_hidden"].clone().requires_grad_()
    weight = p["student_weight"].clone().requires_grad_()
    expected_loss, expected_metrics = reference_loss(name, params, p, hidden, weight)
    expected_loss.backward()

    torch.testing.assert_close(out.loss.double(), expected_loss.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.metrics["loss"].double(), expected_loss.detach(), atol=1e-5, rtol=1e-5)
    for key, value in expected_metrics.items():
        assert key in out.metrics, f"metric {key} missing"
        torch.testing.assert_close(out.metrics[key].double(), value.detach(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"metric {key}: {m}")
    # fp32 sums against float64: the absolute tolerance scales with the gradient's own size
    # (entries that nearly cancel carry the error of the largest terms, not their own).
    for fused_grad, reference_grad in ((grad_hidden, hidden.grad), (grad_weight, weight.grad)):
        scale = float(reference_grad.abs().max())
        torch.testing.assert_close(fused_grad.double(), reference_grad, atol=1e-5 * scale, rtol=1e-4)


def _micro_batch(p, pair_ids, with_rejected):
    """The sub-batch of some pairs, laid out as collate would: its own sequences renumbered."""
    b = p["num_pairs"]
    sequences = list(pair_ids) + ([b + i for i in pair_ids] if with_rejected else [])
    renumber = torch.full((p["num_sequences"],), -1)
    renumber[torch.tensor(sequences)] = torch.arange(len(sequences))
    seq = p["target_sequence"][sequences]
    part = {k: v[sequences] for k, v in p.items() if k in ("targets", "student_hidden", "teacher_hidden",
                                                              "ref_hidden", "reference_logps", "teacher_logps")}
    part.update(target_sequence=torch.where(seq >= 0, renumber[seq.clamp(min=0)], -1), num_pairs=len(pair_ids),
                num_sequences=len(sequences), student_weight=p["student_weight"], teacher_weight=p["teacher_weight"],
                ref_weight=p["ref_weight"])
    return part, sequences


@pytest.mark.parametrize("name,params", [c for c in CASES if c[0] in ("kd", "dpo", "dckd", "adpa", "dadpo_token")][:5])
def test_micro_batch_contributions_add_up(name, params):
    """Split a batch's pairs across two micro-batches with the step's global normalizers: the
    contributions sum to the whole batch's loss and gradient (what lets ranks and accumulation agree)."""
    objective = OBJECTIVES[name](**params)
    p = _problem(pairs=4, seed=7, with_rejected=objective.needs().uses_rejected)
    whole, grad_hidden, grad_weight = _fused(objective, p)
    total_loss, total_weight_grad = 0.0, torch.zeros_like(grad_weight)
    total_metrics = {}
    for pair_ids in ([0, 1], [2, 3]):
        part_problem, rows = _micro_batch(p, pair_ids, objective.needs().uses_rejected)
        part, part_hidden, part_weight = _fused(objective, part_problem, normalizers=_normalizers(p))
        total_loss += float(part.loss.detach())
        total_weight_grad += part_weight
        for key, value in part.metrics.items():
            total_metrics[key] = total_metrics.get(key, 0.0) + float(value)
        torch.testing.assert_close(part_hidden, grad_hidden[rows], atol=1e-6, rtol=1e-5)
    assert math.isclose(total_loss, float(whole.loss.detach()), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(total_weight_grad, grad_weight, atol=1e-6, rtol=1e-5)
    for key, value in whole.metrics.items():
        assert math.isclose(total_metrics[key], float(value), rel_tol=1e-5, abs_tol=1e-6), key


def test_dadpo_with_beta2_zero_is_dpo():
    g = torch.Generator().manual_seed(3)
    logps = [torch.randn(9, generator=g, dtype=torch.float64) * 5 - 30 for _ in range(6)]
    torch.testing.assert_close(dadpo_loss(*logps, beta1=0.25, beta2=0.0), dpo_loss(*logps[:4], beta=0.25))
    p = _problem(pairs=3, seed=11)
    a = _fused(DaDPO(beta1=0.2, beta2=0.0), p)
    b = _fused(DPO(beta=0.2), p)
    torch.testing.assert_close(a[0].loss, b[0].loss)
    torch.testing.assert_close(a[2], b[2])
    for key in ("rewards/chosen", "rewards/margin", "rewards/accuracy"):
        torch.testing.assert_close(a[0].metrics[key], b[0].metrics[key])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "exo_pair", "discopop"])
def test_pair_losses_are_stable_for_any_margin(loss_type):
    huge = torch.tensor([1e4, -1e4, 0.0, 3e4], dtype=torch.float32, requires_grad=True)
    zeros = torch.zeros(4)
    loss = dpo_loss(huge, zeros, zeros, zeros, beta=1.0, loss_type=loss_type,
                    label_smoothing={"sigmoid": 0.1, "robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(huge.grad).all()
    da = dadpo_loss(huge, zeros, zeros, zeros, zeros, -huge.detach(), beta1=1.0, beta2=2.0)
    assert torch.isfinite(da).all()
    if loss_type == "sigmoid":
        # −log σ(−1e4) = 1e4 exactly, not inf; −log σ(1e4) = 0
        assert float(dpo_loss(huge[1:2].detach(), zeros[:1], zeros[:1], zeros[:1], beta=1.0)) == pytest.approx(1e4)


def test_bad_parameters_are_value_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.6)
    with pytest.raises(ValueError, match="beta1"):
        dadpo_loss(x, x, x, x, x, x, beta1=-1.0, beta2=0.1)
    with pytest.raises(ValueError, match="beta2"):
        dadpo_loss(x, x, x, x, x, x, beta1=0.1, beta2=-0.1)


def test_sequence_logps_sum_and_average():
    token_logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, 0.0, -3.0, -1.0]])
    target_sequence = torch.tensor([[-1, 0, 0, -1], [-1, -1, 1, 1]])
    torch.testing.assert_close(sequence_logps(token_logps, target_sequence, 2), torch.tensor([-3.0, -4.0]))
    torch.testing.assert_close(sequence_logps(token_logps, target_sequence, 2, average=True),
                               torch.tensor([-1.5, -2.0]))


def _toy_step(objective, p, lr):
    """One SGD step on the student's hidden states and head; returns the updated problem."""
    _, grad_hidden, grad_weight = _fused(objective, p)
    stepped = dict(p)
    stepped["student_hidden"] = p["student_hidden"] - lr * grad_hidden.double()
    stepped["student_weight"] = p["student_weight"] - lr * grad_weight.double()
    return stepped


def test_dadpo_step_raises_chosen_relative_to_rejected():
    p = _problem(pairs=4, seed=21)
    before = Reference(p, p["student_hidden"], p["student_weight"]).sequence
    after_p = _toy_step(DaDPO(beta1=0.1, beta2=0.1), p, lr=0.5)
    after = Reference(after_p, after_p["student_hidden"], after_p["student_weight"]).sequence
    b = p["num_pairs"]
    assert float((after[:b] - after[b:]).mean()) > float((before[:b] - before[b:]).mean())


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_step_lowers_divergence(kind):
    p = _problem(pairs=3, seed=5, with_rejected=False)
    objective = KD(kind=kind)
    before = _fused(objective, p)[0].metrics["kd/divergence"]
    after = _fused(objective, _toy_step(objective, p, lr=1.0))[0].metrics["kd/divergence"]
    assert float(after) < float(before)


def test_every_contract_objective_is_registered():
    assert set(OBJECTIVES) == {"sft", "kd", "dpo", "dadpo", "dadpo_token", "dckd", "adpa"}
    needs = {name: cls().needs() for name, cls in OBJECTIVES.items()}
    assert needs["dadpo"].cached == ("reference", "teacher") and not needs["dadpo"].online
    assert needs["adpa"].online == ("teacher", "teacher_reference") and needs["dadpo_token"].online == ("teacher",)
    assert [name for name, n in needs.items() if not n.uses_rejected] == ["sft", "kd"]
    assert needs["dadpo_token"].cached == ("reference",)
    assert needs["dadpo"].models == ("teacher",) and needs["dpo"].models == ()  # π_ref defaults to the student
    assert all(n.kernel_calls for n in needs.values())


@pytest.mark.parametrize("name,params,key", [
    ("dpo", dict(beta=0.0), "beta"),
    ("dpo", dict(beta=float("nan")), "beta"),
    ("dpo", dict(loss_type="kto"), "loss_type"),
    ("dpo", dict(label_smoothing=0.1, loss_type="ipo"), "label_smoothing"),
    ("dadpo", dict(beta2=-0.1), "beta2"),
    ("kd", dict(kind="kl"), "kind"),
    ("kd", dict(jsd_beta=0.3), "jsd_beta"),  # applies to kind jsd only
    ("kd", dict(kind="jsd", jsd_beta=1.0), "jsd_beta"),
    ("dadpo_token", dict(temperature=float("inf")), "temperature"),
    ("adpa", dict(gamma=-1.0), "gamma"),
])
def test_bad_objective_parameters_name_the_parameter(name, params, key):
    with pytest.raises(ParameterError) as error:
        OBJECTIVES[name](**params)
    assert error.value.key == key


def test_each_objective_declares_only_the_parameters_it_uses():
    names = {name: {f.name for f in cls.parameters()} for name, cls in OBJECTIVES.items()}
    assert names["sft"] == set()
    assert names["dadpo"] == {"beta1", "beta2", "average_logps"}  # not dDPO's beta, loss_type, label_smoothing
    assert names["adpa"] == {"gamma", "temperature", "approximation", "top_k"}
    assert {"beta", "alpha", "kind", "temperature", "loss_type"} <= names["dadpo_token"]
    for cls in OBJECTIVES.values():
        for f in cls.parameters():
            assert f.metadata["source"] and f.metadata["doc"], (cls.name, f.name)


def test_readme_objective_table_is_the_declared_one():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                  encoding="utf-8").read()
    assert objective_table() in readme, "README's objective table differs from objectives.objective_table()"
