"""Our Phi against transformers' PhiForCausalLM: same logits both ways, same parameter counts."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import PhiConfig, PhiForCausalLM

from scratchlm.model.config import PRESETS, ModelConfig
from scratchlm.model.hf import hf_config, load_hf, save_hf
from scratchlm.model.model import Phi

TINY = ModelConfig(name="parity", vocab_size=1000, padded_vocab_size=1024, n_layer=3, n_embd=64, n_head=4,
                   intermediate_size=256, rotary_pct=0.4, block_size=128)


def _randomise(model: torch.nn.Module) -> None:
    # Non-trivial values everywhere (biases and LayerNorms too), so every converted tensor matters.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)


def test_ours_to_transformers_logits_match(tmp_path):
    torch.manual_seed(0)
    ours = Phi(TINY).eval()
    _randomise(ours)
    save_hf(ours, tmp_path)
    theirs, info = PhiForCausalLM.from_pretrained(tmp_path, output_loading_info=True,
                                                  attn_implementation="eager")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    idx = torch.randint(0, TINY.vocab_size, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs.eval()(idx).logits, rtol=0, atol=1e-5)


def test_transformers_to_ours_logits_match(tmp_path):
    torch.manual_seed(1)
    theirs = PhiForCausalLM(PhiConfig(**{k: v for k, v in hf_config(TINY).items() if k != "architectures"}))
    _randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_hf(str(tmp_path)).eval()
    assert ours.config.n_layer == 3 and ours.config.rotary_dim == 6
    idx = torch.randint(0, TINY.vocab_size, (3, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs.eval()(idx).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,expected", [("phi-2", 2_779_683_840), ("phi-1.5", 1_418_270_720)])
def test_parameter_count_equals_transformers(name, expected):
    cfg = PRESETS[name]
    with torch.device("meta"):
        theirs = PhiForCausalLM(PhiConfig(**{k: v for k,
                                             v in hf_config(cfg).items() if k != "architectures"}))
        ours = Phi(cfg)
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_parameters() == cfg.num_parameters
    if name == "phi-2":
        assert cfg.num_parameters == expected


def test_over_three_billion_is_refused():
    with pytest.raises(ValueError, match="over scratchlm's limit"):
        PRESETS["phi-2"].replace(n_layer=40)


def test_fresh_model_loss_is_near_uniform(tokenizer, corpus_dir):
    torch.manual_seed(0)
    model = Phi(PRESETS["phi-tiny"]).eval()
    text = (corpus_dir / "wikipedia" / "enwiki2015_AA_wiki_01.txt").read_text()[:30000]
    ids = torch.tensor(tokenizer.encode(text)[: 4 * 257]).view(4, 257)
    with torch.no_grad():
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(loss - math.log(50295)) < 0.5, loss


def _random_tiny() -> Phi:
    torch.manual_seed(0)
    model = Phi(TINY).eval()
    _randomise(model)
    return model


def test_kv_cache_decoding_equals_full_forward():
    from scratchlm.model.kv_cache import KVCache

    model = _random_tiny()
    idx = torch.randint(0, TINY.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model, batch_size=2, max_seq_len=32)
        prefill = model.lm_head(cache.forward(model, idx[:, :12], torch.arange(12)))
        steps = [model.lm_head(cache.forward(model, idx[:, t : t + 1], torch.tensor([t]))) for t in range(12,
                                                                                                          20)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=0, atol=1e-5)


def test_sequence_longer_than_block_size_is_refused():
    model = Phi(TINY)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_packed_cpu_linears_equal_plain_ones_and_follow_weight_changes():
    from scratchlm.model.cpu_inference import PackedLinear, pack_linears

    model = _random_tiny()
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    with torch.no_grad():
        plain = model(idx)
        packed_count = pack_linears(model)
        # fc1, fc2 (256 × 64 = 16k elements) stay plain at this size; the LM head (1024 × 64) is packed.
        assert packed_count == 1 and isinstance(model.lm_head.forward, PackedLinear)
        torch.testing.assert_close(model(idx), plain, rtol=0, atol=1e-5)
        model.lm_head.weight.mul_(2.0)  # an in-place change must not leave a stale packed copy
        reference = F.linear(model.trunk(idx, model.rope_cos[:33], model.rope_sin[:33]), model.lm_head.weight,
                             model.lm_head.bias)
        torch.testing.assert_close(model(idx), reference, rtol=0, atol=1e-5)
        assert not torch.allclose(reference, plain)
    pack_linears(model)
    loss = model(idx).float().logsumexp(-1).mean()  # gradients on: the plain path, so backward works
    loss.backward()
    assert model.lm_head.weight.grad is not None


# A bf16 step rounds the activations a layer hands on (2^-9 relative, half an ulp), three layers deep; at this
# model's logits (|z| < 2) that is a few thousandths. Two logits nearer than this are a tie bf16 may break
# either way, on this machine or the next.
BF16_LOGIT_TOL = 0.03


def test_cpu_generation_in_bf16_follows_the_model():
    """bf16 decoding on the CPU (packed linears, float32 cache and attention) picks, at each step, a token
    that full forwards of the same bf16 weights in float32 rank first: the argmax itself wherever it is
    clear, and otherwise one within bf16's rounding of it (a near-tie, which precision may break either
    way)."""
    from scratchlm.teacher.engine import GenerationEngine
    from scratchlm.teacher.sampling import SamplingParams

    model = _random_tiny().to(torch.bfloat16)
    prompt = torch.randint(0, TINY.vocab_size, (8,)).tolist()
    new = GenerationEngine(model, eot_id=0, batch_size=2, max_seq_len=40).generate(
        [prompt], SamplingParams(max_new_tokens=6, temperature=0, stop_at_eot=False))[0]
    with torch.no_grad():  # the reference along the engine's own path: one near-tie cannot derail the rest
        logits = model.float()(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1, : TINY.vocab_size]
    chosen = logits.gather(1, torch.tensor(new)[:, None]).squeeze(1)
    best, second = logits.topk(2, dim=-1).values.unbind(-1)
    assert len(new) == 6 and (chosen >= best - BF16_LOGIT_TOL).all(), (chosen, best)
    clear = best - second > 2 * BF16_LOGIT_TOL
    assert (torch.tensor(new)[clear] == logits.argmax(-1)[clear]).all()


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
def test_chunked_head_and_loss_equal_autograd_through_the_full_logits(chunk_rows):
    from scratchlm.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 64, requires_grad=True)  # 150 rows: chunks of 7 leave a remainder
    weight = (0.2 * torch.randn(1024, 64)).requires_grad_()
    bias = (0.1 * torch.randn(1024)).requires_grad_()
    targets = torch.randint(0, 1000, (3, 50))
    plain = F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, 1), targets.flatten())
    expected = torch.autograd.grad(plain * 0.25, (hidden, weight, bias))  # a scaled loss: grad_accum's 1/K
    chunked = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows).loss
    got = torch.autograd.grad(chunked * 0.25, (hidden, weight, bias))
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the loss alone
        evaluated = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows).loss
        torch.testing.assert_close(evaluated, plain, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, float32 loss and accumulators
        low = linear_cross_entropy(hidden, weight, bias, targets, chunk_rows).loss
        low_grads = torch.autograd.grad(low, (hidden, weight, bias))
    assert low.dtype == torch.float32 and abs(low.item() - plain.item()) < 0.05
    assert [g.dtype for g in low_grads] == [torch.float32] * 3
    torch.testing.assert_close(low_grads[1], expected[1] * 4, rtol=0.05, atol=2e-3)


def test_model_loss_with_targets_equals_transformers_cross_entropy(tmp_path):
    model = _random_tiny()
    save_hf(model, tmp_path)
    theirs = PhiForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 41))
    with torch.no_grad():
        ref = F.cross_entropy(theirs(idx[:, :-1]).logits.flatten(0, 1), idx[:, 1:].flatten())
        torch.testing.assert_close(model(idx[:, :-1], targets=idx[:, 1:]).loss, ref, rtol=0, atol=1e-5)
