"""Checks that need a CUDA device; run by bench/gpu_check.sh. On a CPU-only machine they are skipped, and the
CPU parity tests in test_model.py cover the same code in fp32."""

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from scratchlm.model.config import PRESETS
from scratchlm.model.hf import hf_config, to_hf_state_dict
from scratchlm.model.model import Phi

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (bench/gpu_check.sh)")]


@pytest.mark.parametrize("name", ["phi-1.5", "phi-2"])
def test_bf16_logits_match_transformers(name):
    # full width, fewer layers: the same kernels, a fraction of the memory
    cfg = PRESETS[name].replace(n_layer=4)
    torch.manual_seed(0)
    ours = Phi(cfg).to("cuda", torch.bfloat16).eval()
    hf_cfg = PhiConfig(**{k: v for k,
                          v in hf_config(cfg).items() if k not in ("architectures", "torch_dtype")})
    theirs = PhiForCausalLM(hf_cfg).to("cuda", torch.bfloat16).eval()
    theirs.load_state_dict(to_hf_state_dict(ours))
    idx = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    with torch.no_grad():
        a, b = ours(idx).float(), theirs(idx).logits.float()
    # bf16 keeps ~3 significant digits; compare the predictions and the bulk of the logits.
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.99
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)
