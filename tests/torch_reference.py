"""Reference models built with the real `moshi` PyTorch package (random weights, no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tttjax.model.config import MOSHI_7B_LM_KWARGS


def lm_kwargs(**changes) -> dict:
    """A small moshi LM config in the 7B family (7B delays and options, small dims)."""
    cfg = dict(MOSHI_7B_LM_KWARGS, dim=64, num_layers=2, num_heads=4, card=32, text_card=40,
               depformer_dim=32, depformer_dim_feedforward=132, depformer_num_heads=2,
               depformer_num_layers=2, context=3000)
    cfg.update(changes)
    return cfg


def build_lm(kwargs: dict, *, lora_rank: int = 0, lora_scaling: float = 2.0, seed: int = 0):
    """A random moshi LMModel with every parameter perturbed (norm alphas off 1, LoRA B non-zero)
    so that an ignored or misplaced parameter shows up in a comparison."""
    from moshi.models import loaders

    torch.manual_seed(seed)
    extra = dict(lora=True, lora_rank=lora_rank, lora_scaling=lora_scaling) if lora_rank else {}
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(kwargs, **extra), device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("alpha"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return lm.eval()


def state_dict_numpy(lm) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy().copy() for k, v in lm.state_dict().items()}


def to_release_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """moshi in-memory names -> the released fused names (depformer per-step matrices on dim 0)."""
    out, fused = {}, {}
    for name, value in sd.items():
        for proj, new in ((".self_attn.in_projs.", ".self_attn.in_proj_weight"),
                          (".self_attn.out_projs.", ".self_attn.out_proj.weight")):
            if proj in name and name.endswith(".weight") and ".lora_" not in name:
                stem, rest = name.split(proj)
                step = int(rest.split(".")[0])
                fused.setdefault(stem + new, {})[step] = value
                break
        else:
            out[name] = value
    for name, steps in fused.items():
        out[name] = np.concatenate([steps[s] for s in sorted(steps)], axis=0)
    return out


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype=torch.float32) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v)).to(dtype) for k, v in sorted(tensors.items())},
              str(path), metadata={"format": "pt"})
    return path


def save_config(path: Path, kwargs: dict, **extra) -> Path:
    path.write_text(json.dumps(dict(kwargs, **extra), indent=4))
    return path


def random_codes(kwargs: dict, batch: int, frames: int, seed: int = 0, pad_tail: int = 3) -> np.ndarray:
    """Codes [B, 17, T]; the last `pad_tail` frames of the last sample are -1 (as batches padded by moshi)."""
    rng = np.random.default_rng(seed)
    codes = np.concatenate([rng.integers(0, kwargs["text_card"], (batch, 1, frames)),
                            rng.integers(0, kwargs["card"], (batch, kwargs["n_q"], frames))], axis=1)
    if pad_tail:
        codes[-1, :, -pad_tail:] = -1
    return codes.astype(np.int64)


def torch_forward(lm, codes: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = lm(torch.from_numpy(codes))
    return {"text_logits": out.text_logits.float().numpy(), "logits": out.logits.float().numpy(),
            "text_mask": out.text_mask.numpy(), "mask": out.mask.numpy()}
