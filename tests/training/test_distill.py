"""Distillation: the loss inside the chunked head against a dense autograd reference, its limits, and runs
that learn from a teacher's distribution (from a feed and from prepared shards), resumed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scratchlm.model.loss import Distill, LossTerms, linear_cross_entropy
from scratchlm.model.soft_labels import SoftLabels

V, D, K = 300, 16, 6


def dense_reference(hidden, weight, bias, targets, soft: SoftLabels, distill: Distill) -> torch.Tensor:
    """The same loss with the whole logits, a full softmax and autograd (float64)."""
    logits = (hidden @ weight.T + bias).double()
    ce = F.cross_entropy(logits, targets, reduction="none")
    t = distill.temperature
    logp = torch.log_softmax(logits / t, dim=-1)
    log_p_k = logp.gather(1, soft.ids)
    log_p_rest = torch.log1p(-log_p_k.exp().sum(-1))
    q_k = soft.logprobs.double().exp()
    q_rest = 1 - q_k.sum(-1)
    if t != 1:
        q = (torch.cat([soft.logprobs.double(), q_rest.log()[:, None]], 1) / t).softmax(-1)
        q_k, q_rest = q[:, :-1], q[:, -1]
    kl = (q_k * (q_k.log() - log_p_k)).sum(-1) + q_rest * (q_rest.log() - log_p_rest)
    a = soft.mask.double() * distill.weight
    return ((1 - a) * ce + a * t * t * kl).mean()


def _case(seed: int, masked: bool, flat_teacher: bool = False):
    """Rows of a head's input, its weights, targets and a teacher's top K. ``flat_teacher``: the teacher a
    flatter copy of the student, so the student holds more of its mass on the teacher's ids than the teacher
    does (the rest-mass ratio r above 1, the fused gradient's row scale 1 − A·r below zero)."""
    g = torch.Generator().manual_seed(seed)
    n = 37
    hidden = torch.randn(n, D, generator=g)
    weight, bias = torch.randn(V, D, generator=g) * 0.5, torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (n,), generator=g)
    teacher = torch.log_softmax(torch.randn(n, V, generator=g) * 2, dim=-1)
    if flat_teacher:
        teacher = torch.log_softmax((hidden @ weight.T + bias) * 0.3, dim=-1)
    top = teacher.topk(K, dim=-1)  # a real truncated distribution: the rest of the mass is left out
    mask = torch.rand(n, generator=g) > 0.3 if masked else torch.ones(n, dtype=torch.bool)
    return hidden, weight, bias, targets, SoftLabels(top.indices, top.values, mask)


def _grads(fn, hidden, weight, bias):
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    loss = fn(*leaves)
    loss = loss.loss if isinstance(loss, LossTerms) else loss  # the dense reference is a tensor
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True], ids=["every position", "a positions mask"])
@pytest.mark.parametrize("flat_teacher", [False, True], ids=["", "student sharper than teacher"])
def test_the_chunked_loss_equals_a_dense_autograd_reference(temperature, masked, flat_teacher):
    """At T = 1 the KL shares the cross-entropy's softmax and forms one gradient (model/loss.py); at T ≠ 1
    it takes its own softmax: both equal the dense loss and its gradients."""
    hidden, weight, bias, targets, soft = _case(0, masked, flat_teacher)
    distill = Distill(0.9 if flat_teacher else 0.7, temperature)
    ours, ours_grads = _grads(lambda h, w, b: linear_cross_entropy(h, w, b, targets, chunk_rows=8, soft=soft,
                                                                   distill=distill), hidden, weight, bias)
    ref, ref_grads = _grads(lambda h, w, b: dense_reference(h.double(), w.double(), b.double(), targets, soft,
                                                            distill), hidden, weight, bias)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert torch.allclose(a.double(), b.double(), atol=1e-5), (a - b).abs().max()


def test_weight_zero_is_the_plain_loss_and_weight_one_leaves_unlabelled_positions_plain():
    hidden, weight, bias, targets, soft = _case(1, masked=True)
    plain, plain_grads = _grads(lambda h, w, b: linear_cross_entropy(h, w, b, targets, chunk_rows=8),
                                hidden, weight, bias)
    off, off_grads = _grads(lambda h, w, b: linear_cross_entropy(h, w, b, targets, chunk_rows=8, soft=soft,
                                                                 distill=Distill(0.0)), hidden, weight, bias)
    assert off.item() == plain.item() and all(torch.equal(a, b) for a, b in zip(off_grads, plain_grads,
                                                                                strict=True))
    # A = 1: a position without soft labels keeps exactly its cross-entropy.
    none = SoftLabels(soft.ids, soft.logprobs, torch.zeros_like(soft.mask))
    terms = linear_cross_entropy(hidden, weight, bias, targets, soft=none, distill=Distill(1.0))
    assert terms.loss.item() == pytest.approx(plain.item(), abs=1e-6) and terms.kd.item() == 0.0
    full = linear_cross_entropy(hidden, weight, bias, targets, soft=soft, distill=Distill(1.0))
    unlabelled = ~soft.mask
    ce = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")
    assert full.loss.item() > 0 and full.kd.item() > 0
    assert full.loss.item() == pytest.approx(
        (ce[unlabelled].sum().item() + full.kd.item() * soft.mask.sum().item()) / len(targets), rel=1e-5)


def test_the_loss_is_the_same_under_bf16_autocast_within_its_rounding():
    hidden, weight, bias, targets, soft = _case(2, masked=True)
    distill = Distill(0.5)
    exact = linear_cross_entropy(hidden, weight, bias, targets, soft=soft, distill=distill).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = linear_cross_entropy(hidden, weight, bias, targets, soft=soft, distill=distill).loss
    assert rounded.item() == pytest.approx(exact.item(), rel=2e-2)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_distilled_run_from_a_feed_resumes_exactly_and_its_kl_falls(small_corpus, tmp_path, tokenizer):
    # A teacher that knows something: phi-tiny trained briefly on the same text, scoring the corpus as the
    # feed serves it; the student from random weights learns its distribution.
    from servers import FeedThread

    from scratchlm.feed.server import ServeConfig
    from scratchlm.teacher.backends import LocalTeacher
    from scratchlm.training import TrainConfig, train

    common = dict(model="phi-tiny", block_size=64, micro_batch_size=4, eval_batches=1, eval_interval=100,
                  device="cpu", lr=3e-3, warmup_steps=2)
    train(TrainConfig(**common, data=str(small_corpus), out=str(tmp_path / "teacher"), max_steps=30,
                      eval_fraction=0.05))
    teacher = LocalTeacher(str(tmp_path / "teacher" / "final"), device="cpu", batch_size=16,
                           dtype=torch.float32)
    # Short documents, one a request: the teacher scores little more than the student reads.
    cfg = ServeConfig(corpus=str(small_corpus), soft_labels=8, score_corpus=True, eval_fraction=0.05,
                      chunk_chars=1000)
    student = dict(common, soft_labels=8, distill_weight=0.8, lr_decay_steps=20, checkpoint_interval=10,
                   feed_shuffle_tokens=16 * 65, feed_texts_per_request=2)
    with FeedThread(cfg, teacher=teacher) as feed:
        train(TrainConfig(**student, data=feed.url, out=str(tmp_path / "straight"), max_steps=20))
        train(TrainConfig(**student, data=feed.url, out=str(tmp_path / "resumed"), max_steps=10))
        train(TrainConfig(**student, data=feed.url, out=str(tmp_path / "resumed"), max_steps=20,
                          resume="auto"))
    teacher.close()
    a, b = ([r for r in _records(tmp_path / run) if "loss" in r] for run in ("straight", "resumed"))
    assert [r["step"] for r in b] == list(range(1, 21))
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 and abs(x["kd_loss"] - y["kd_loss"]) <= 1e-6
               for x, y in zip(a, b, strict=True))
    assert all(r["soft_label_share"] > 0.9 for r in a)  # corpus text scored: nearly every target has a row
    kd = [r["kd_loss"] for r in a]
    assert np.mean(kd[-5:]) < 0.7 * np.mean(kd[:5])  # the loss is wired: the student moves to the teacher
    assert "kd " in (tmp_path / "straight" / "train.log").read_text()
    # The report: plain and distilled runs on one figure (against wall time too), and the tokens to reach.
    from scratchlm.reporting.command import ReportRequest, build_report

    report = build_report(ReportRequest([tmp_path / "teacher", tmp_path / "straight"], tmp_path / "report"))
    table = report["comparisons"]
    assert table["kinds"] == {"teacher": "corpus", "straight": "knowledge"}
    assert table["runs"]["straight"]["control"] == "teacher"
    teacher_evals = [r["eval_loss"] for r in _records(tmp_path / "teacher") if "eval_loss" in r]
    assert table["runs"]["straight"]["target"] == teacher_evals[-1]
    # No feed run here: the corpus run stands in as the knowledge's control, and the report says so.
    assert table["answered_against"] == {"knowledge": "corpus"}
    means = table["means"]
    assert table["answers"]["knowledge"] == pytest.approx(means["knowledge"] - means["corpus"])
    assert "there is no feed run" in (tmp_path / "report" / "report.md").read_text()
    curves = json.loads((tmp_path / "report" / "loss_curves.json").read_text())
    assert len(curves["straight"]["eval"]["elapsed_s"]) == len(curves["straight"]["eval"]["loss"])
