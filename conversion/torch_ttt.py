"""TTT-MLP layers for the PyTorch `moshi` LMModel, to evaluate exported TTT-Moshi checkpoints in PyTorch.

    lm = load_ttt_moshi("consolidated.safetensors", "config.json")            # full export
    lm = load_ttt_moshi("base.safetensors", "config.json", lora="lora.safetensors")  # adapters
    out = lm(codes)   # LMOutput, as moshi's LMModel.forward

The maths is DESIGN.md section 4 (dual form over mini-batches, causal or bidirectional step-size
matrix, fp32 inner loop); the module and parameter names are the export contract
(`transformer.layers.N.seq_modeling_block.ttt_layer.ttt.*`, `...forward_ssm_gating.gating_alpha`).
This is an evaluation port (teacher-forced forward), not a streaming one.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tttjax.model.config import parse_ttt_layers

_TTT_KEYS = ("enable", "layers", "base_lr", "mini_batch_size", "causal", "initial_gating_alpha", "num_heads",
             "scan_remat_group")


def _gelu_tanh_grad(x):
    k = 0.7978845608028654  # sqrt(2 / pi)
    inner = k * (x + 0.044715 * x ** 3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


def _layer_norm(z, weight, bias, eps=1e-8):
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, keepdim=True, unbiased=False)
    return (z - mu) / torch.sqrt(var + eps) * weight + bias


def _layer_norm_l2_grad(z, target, weight, bias, eps=1e-8):
    """d/dz of 1/2 || LN(z) - target ||^2, LN with biased variance and affine weight/bias."""
    d = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    std = torch.sqrt(z.var(-1, keepdim=True, unbiased=False) + eps)
    xhat = (z - mu) / std
    g = (xhat * weight + bias - target) * weight
    return (d * g - g.sum(-1, keepdim=True) - xhat * (g * xhat).sum(-1, keepdim=True)) / (d * std)


class TTTMLP(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, mini_batch_size: int, base_lr: float, causal: bool):
        super().__init__()
        H, d = num_heads, dim // num_heads
        self.num_heads, self.head_dim = H, d
        self.mini_batch_size, self.base_lr, self.causal = mini_batch_size, base_lr, causal
        self.W1 = nn.Parameter(torch.zeros(H, d, 4 * d))
        self.b1 = nn.Parameter(torch.zeros(H, 1, 4 * d))
        self.W2 = nn.Parameter(torch.zeros(H, 4 * d, d))
        self.b2 = nn.Parameter(torch.zeros(H, 1, d))
        self.learnable_ttt_lr_weight = nn.Parameter(torch.zeros(H, 1, dim))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.zeros(H, 1))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, d))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, d))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.post_norm = nn.LayerNorm(dim, eps=1e-6)

    def _heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2).float()  # [B, H, T, d]

    def forward(self, h):
        B, T, D = h.shape
        K, d = self.mini_batch_size, self.head_dim
        xq = F.normalize(self._heads(self.wq(h)), dim=-1, eps=1e-12)
        xk = F.normalize(self._heads(self.wk(h)), dim=-1, eps=1e-12)
        xv = self._heads(self.wv(h))
        nw, nb = self.ttt_norm_weight.float()[None, :, None], self.ttt_norm_bias.float()[None, :, None]
        v = xv - xk
        target = (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-8) * nw + nb
        logits = torch.einsum("btd,hd->bht", h.float(), self.learnable_ttt_lr_weight.float()[:, 0])
        lr = self.base_lr * torch.sigmoid(logits + self.learnable_ttt_lr_bias.float()) / d  # [B, H, T]
        pad = (-T) % K
        if pad:
            xq, xk, target = (F.pad(a, (0, 0, 0, pad)) for a in (xq, xk, target))
            lr = F.pad(lr, (0, pad))  # padded tokens get step size 0
        i = torch.arange(1, K + 1, dtype=torch.float32)
        scale = (1.0 / i)[:, None] * torch.tril(torch.ones(K, K)) if self.causal else torch.full((K, K), 1.0 / K)
        nw, nb = nw[:, :, 0][:, :, None], nb[:, :, 0][:, :, None]  # [1, H, 1, d]
        W1 = self.W1.float().expand(B, -1, -1, -1)
        b1 = self.b1.float().expand(B, -1, -1, -1)
        W2 = self.W2.float().expand(B, -1, -1, -1)
        b2 = self.b2.float().expand(B, -1, -1, -1)
        outs = []
        for s in range(0, T + pad, K):
            q, k, tgt, eta = xq[:, :, s:s + K], xk[:, :, s:s + K], target[:, :, s:s + K], lr[:, :, s:s + K]
            E = scale * eta[:, :, None, :]  # E[i, j] = lr_j / i (causal) or lr_j / K
            Z1 = k @ W1 + b1
            X2 = F.gelu(Z1, approximate="tanh")
            Z2 = X2 @ W2 + b2
            G2 = _layer_norm_l2_grad(Z2, tgt, nw, nb)
            G1 = (G2 @ W2.transpose(-1, -2)) * _gelu_tanh_grad(Z1)
            Z1b = q @ W1 - (E * (q @ k.transpose(-1, -2))) @ G1 + b1 - E @ G1
            X2b = F.gelu(Z1b, approximate="tanh")
            Z2b = X2b @ W2 - (E * (X2b @ X2.transpose(-1, -2))) @ G2 + b2 - E @ G2
            outs.append(q + _layer_norm(Z2b, nw, nb))
            e = E[:, :, -1, :, None]  # the last row: the mini-batch's update
            W1 = W1 - (e * k).transpose(-1, -2) @ G1
            b1 = b1 - (e * G1).sum(-2, keepdim=True)
            W2 = W2 - (e * X2).transpose(-1, -2) @ G2
            b2 = b2 - (e * G2).sum(-2, keepdim=True)
        out = torch.cat(outs, dim=2)[:, :, :T].transpose(1, 2).reshape(B, T, D)
        out = F.layer_norm(out, (D,), self.post_norm.weight.float(), self.post_norm.bias.float(), 1e-6)
        return self.wo(out.to(h.dtype))


class _TTTLayer(nn.Module):
    def __init__(self, ttt: TTTMLP):
        super().__init__()
        self.ttt = ttt


class _Gating(nn.Module):
    def __init__(self, dim: int, alpha: float):
        super().__init__()
        self.gating_alpha = nn.Parameter(torch.full((dim,), alpha))


class SeqModelingBlock(nn.Module):
    """`h + tanh(gating_alpha) * TTT(h)`, placed between a layer's attention and feed-forward."""

    def __init__(self, dim: int, num_heads: int, *, mini_batch_size: int, base_lr: float, causal: bool,
                 initial_gating_alpha: float):
        super().__init__()
        self.ttt_layer = _TTTLayer(TTTMLP(dim, num_heads, mini_batch_size=mini_batch_size, base_lr=base_lr,
                                          causal=causal))
        self.forward_ssm_gating = _Gating(dim, initial_gating_alpha)

    def forward(self, h):
        return h + torch.tanh(self.forward_ssm_gating.gating_alpha) * self.ttt_layer.ttt(h)


def _layer_forward(self, x, cross_attention_src=None):
    x = self._sa_block(x)
    x = self.seq_modeling_block(x)
    return self._ff_block(x)


def attach_ttt(lm, ttt: dict):
    """Insert TTT blocks into `lm`'s temporal layers as the `"ttt"` block of config.json says."""
    unknown = set(ttt) - set(_TTT_KEYS)
    if unknown:
        raise ValueError(f"unknown keys in the 'ttt' block: {sorted(unknown)}")
    if not ttt.get("enable"):
        return lm
    layers = lm.transformer.layers
    dim = lm.dim
    num_heads = int(ttt.get("num_heads") or layers[0].self_attn.num_heads)
    for index in parse_ttt_layers(ttt.get("layers", "none"), len(layers)):
        layer = layers[index]
        layer.seq_modeling_block = SeqModelingBlock(
            dim, num_heads, mini_batch_size=int(ttt.get("mini_batch_size", 16)),
            base_lr=float(ttt.get("base_lr", 1.0)), causal=bool(ttt.get("causal", True)),
            initial_gating_alpha=float(ttt.get("initial_gating_alpha", 0.1)))
        layer.forward = types.MethodType(_layer_forward, layer)
    return lm


def load_ttt_moshi(weights: str | Path, config: str | Path, *, lora: str | Path | None = None,
                   device: str = "cpu", dtype=torch.float32):
    """A moshi LMModel with TTT layers and the weights of a tttjax export (strict load).

    weights: a full export (`consolidated.safetensors`), or the base weights when `lora` (an
    adapters-only `lora.safetensors`, whose config.json has the lora keys) is given.
    """
    from moshi.models import loaders
    from safetensors.torch import load_file

    cfg = json.loads(Path(config).read_text())
    ttt = cfg.pop("ttt", {}) or {}
    adapter_keys = {k: cfg.pop(k) for k in ("lora", "lora_rank", "lora_scaling") if k in cfg}
    if lora is not None:
        if "lora_rank" not in adapter_keys:
            raise ValueError(f"{config}: a LoRA file needs lora_rank / lora_scaling in config.json")
        cfg.update(lora=True, lora_rank=adapter_keys["lora_rank"], lora_scaling=adapter_keys.get("lora_scaling", 2.0))
    lm = loaders.get_moshi_lm(None, lm_kwargs=cfg, device=device, dtype=dtype)
    attach_ttt(lm, ttt)
    lm.to(device=device, dtype=dtype)
    state = load_file(str(weights))
    if lora is not None:
        state.update(load_file(str(lora)))  # moshi's load hook maps X.weight -> X.frozen_W.weight
    lm.load_state_dict(state, strict=True)
    return lm.eval()
