"""TTT-MLP layers for the PyTorch `moshi` LMModel: evaluate and stream exported TTT-Moshi checkpoints.

    lm = load_ttt_moshi("consolidated.safetensors", "config.json")                   # full export
    lm = load_ttt_moshi("base.safetensors", "config.json", lora="lora.safetensors")  # adapters
    out = lm(codes)                       # LMOutput, as moshi's LMModel.forward
    gen = LMGen(lm, use_sampling=False)   # moshi's frame-by-frame generation, TTT state carried
    with gen.streaming(1):
        frame = gen.step(user_codes_t)

The maths is docs/contract.md §4 (dual form over mini-batches, causal or bidirectional step-size
matrix, fp32 inner loop); the module and parameter names are the export contract
(`transformer.layers.N.seq_modeling_block.ttt_layer.ttt.*`, `...forward_ssm_gating.gating_alpha`).
One function, `ttt_mlp_chunk`, computes the layer over a chunk of tokens continuing a carried
inner state (`Inner`: the weights at the start of the current mini-batch, the step-size-weighted
gradient sums of its tokens seen so far, and how many), as tttjax.model.streaming does: the
teacher-forced forward is one chunk from a fresh state, and under moshi's streaming machinery
(`lm.streaming(B)`, which LMGen enters) `TTTMLP` keeps the state between calls in its
`StreamingModule` state, so a sequence fed in chunks of any size (LMGen: one frame) gives the
teacher-forced outputs. The state is updated in place and the step never reads a tensor back to
the host, as moshi's CUDA-graphed LMGen step needs. The bidirectional mode (`ttt.causal=false`)
cannot stream and is refused there.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from moshi.modules.streaming import State, StreamingModule
from torch import nn

from tttjax.model.config import LORA_SCALING, parse_ttt_layers, read_ttt_block
from tttjax.rundir import read_json


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


class Inner(NamedTuple):
    """Carried inner state of one TTT layer, fp32, [B, H, ...]: weights at the current mini-batch start,
    sum_j lr_j grad_j over its tokens seen so far (gradients at those weights), and how many (pos [B])."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    gw1: torch.Tensor
    gb1: torch.Tensor
    gw2: torch.Tensor
    gb2: torch.Tensor
    pos: torch.Tensor


def ttt_mlp_chunk(inner: Inner, xq, xk, target, lr, norm_w, norm_b, *, mini_batch_size: int, causal: bool,
                  max_start: int):
    """TTT-MLP over a chunk of T tokens continuing `inner`: xq, xk (L2-normalised), target [B, H, T, d], lr [B, H, T].

    Token t goes to slot pos + t of a zero buffer aligned with the mini-batches (padding slots have
    lr 0), so the dual form runs on whole mini-batches: a query at slot i (1-based) uses
    W_start - (carried sum + sum_{j<=i} lr_j grad_j) / i (causal; bidirectional: every query uses
    all K tokens, / K), and a mini-batch commits W_start - (its sum) / K only if the chunk reaches
    its last slot. `max_start` bounds pos (0 for a fresh state, K - 1 otherwise) to size the buffer
    without reading pos back. Returns (inner, out [B, H, T, d]).
    """
    B, H, T, d = xq.shape
    K = mini_batch_size
    num = -(-(max_start + T) // K)
    slots = inner.pos[:, None] + torch.arange(T, device=xq.device)  # [B, T]

    def index(extra: int):
        return slots.view(B, 1, T, *(1,) * extra).expand(B, H, T, *((d,) * extra))

    def place(a):  # [B, H, T, *r] -> [B, H, num, K, *r]
        r = a.shape[3:]
        buf = a.new_zeros(B, H, num * K, *r).scatter(2, index(len(r)), a)
        return buf.view(B, H, num, K, *r)

    xq, xk, target, lr = (place(a) for a in (xq, xk, target, lr))
    i = torch.arange(1, K + 1, dtype=torch.float32, device=xq.device)[:, None]
    rows = i if causal else torch.full_like(i, K)
    scale = torch.tril(torch.ones(K, K, device=xq.device)) / i if causal else torch.full((K, K), 1.0 / K,
                                                                                      device=xq.device)
    w1, b1, w2, b2, gw1, gb1, gw2, gb2 = inner[:8]
    outs = []
    for n in range(num):
        q, k, tgt, eta = xq[:, :, n], xk[:, :, n], target[:, :, n], lr[:, :, n]
        E = scale * eta[:, :, None, :]  # E[i, j] = lr_j / i (causal) or lr_j / K
        Z1 = k @ w1 + b1
        X2 = F.gelu(Z1, approximate="tanh")
        G2 = _layer_norm_l2_grad(X2 @ w2 + b2, tgt, norm_w, norm_b)
        G1 = (G2 @ w2.transpose(-1, -2)) * _gelu_tanh_grad(Z1)
        Z1b = q @ w1 + b1 - (q @ gw1 + gb1) / rows - (E * (q @ k.transpose(-1, -2) + 1)) @ G1
        X2b = F.gelu(Z1b, approximate="tanh")
        Z2b = X2b @ w2 + b2 - (X2b @ gw2 + gb2) / rows - (E * (X2b @ X2.transpose(-1, -2) + 1)) @ G2
        outs.append(q + _layer_norm(Z2b, norm_w, norm_b))
        u1, u2 = eta[..., None] * G1, eta[..., None] * G2
        gw1, gb1 = gw1 + k.transpose(-1, -2) @ u1, gb1 + u1.sum(-2, keepdim=True)
        gw2, gb2 = gw2 + X2.transpose(-1, -2) @ u2, gb2 + u2.sum(-2, keepdim=True)
        done = (inner.pos + T >= (n + 1) * K).view(B, 1, 1, 1).float()  # the chunk fills this mini-batch
        w1, b1, w2, b2 = (torch.addcmul(w, g, done, value=-1.0 / K)
                          for w, g in ((w1, gw1), (b1, gb1), (w2, gw2), (b2, gb2)))
        gw1, gb1, gw2, gb2 = (g * (1 - done) for g in (gw1, gb1, gw2, gb2))
    out = torch.cat(outs, dim=2).gather(2, index(1))
    return Inner(w1, b1, w2, b2, gw1, gb1, gw2, gb2, (inner.pos + T) % K), out


def check_streamable(causal: bool, mini_batch_size: int) -> None:
    if not causal:
        raise ValueError(
            "ttt.causal=false (the bidirectional compatibility mode) lets each frame read up to "
            f"mini_batch_size-1 = {mini_batch_size - 1} future frames of its TTT mini-batch, so it cannot run "
            "frame by frame: streaming needs a model trained with ttt.causal=true")


@dataclasses.dataclass
class TTTState(State):
    """A TTT layer's streaming state: the carried `Inner` and the fresh one that reset() returns to."""

    inner: Inner
    fresh: Inner

    def _assign(self, new: Inner, mask: torch.Tensor) -> None:
        for cur, value in zip(self.inner, new):  # in place: a CUDA graph replays writes, not assignments
            torch.where(mask.view(-1, *(1,) * (cur.dim() - 1)), value, cur, out=cur)

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self._assign(self.fresh, reset_mask)


class TTTMLP(StreamingModule[TTTState]):
    """TTT(h) of docs/contract.md §4; a moshi StreamingModule, so `lm.streaming(B)` carries its state."""

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

    def fresh_inner(self, batch_size: int, *, detach: bool = True) -> Inner:
        """The state at the start of a sequence: the parameters W1, b1, W2, b2, nothing absorbed
        (`detach=False`: gradients reach the parameters, as in a whole-sequence training forward)."""
        weights = [(p.detach() if detach else p).float().expand(batch_size, *p.shape).clone()
                   for p in (self.W1, self.b1, self.W2, self.b2)]
        pos = torch.zeros(batch_size, dtype=torch.long, device=self.W1.device)
        return Inner(*weights, *(torch.zeros_like(w) for w in weights), pos)

    def _init_streaming_state(self, batch_size: int) -> TTTState:
        check_streamable(self.causal, self.mini_batch_size)
        return TTTState(batch_size, self.W1.device, self.fresh_inner(batch_size), self.fresh_inner(batch_size))

    def _heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2).float()  # [B, H, T, d]

    def forward(self, h):
        B, T, D = h.shape
        d = self.head_dim
        xq = F.normalize(self._heads(self.wq(h)), dim=-1, eps=1e-12)
        xk = F.normalize(self._heads(self.wk(h)), dim=-1, eps=1e-12)
        xv = self._heads(self.wv(h))
        nw, nb = self.ttt_norm_weight.float()[None, :, None], self.ttt_norm_bias.float()[None, :, None]
        v = xv - xk
        target = (v - v.mean(-1, keepdim=True)) / (v.std(-1, keepdim=True) + 1e-8) * nw + nb
        logits = torch.einsum("btd,hd->bht", h.float(), self.learnable_ttt_lr_weight.float()[:, 0])
        lr = self.base_lr * torch.sigmoid(logits + self.learnable_ttt_lr_bias.float()) / d  # [B, H, T]
        state = self._streaming_state
        inner = self.fresh_inner(B, detach=False) if state is None else state.inner
        new, out = ttt_mlp_chunk(inner, xq, xk, target, lr, nw, nb, mini_batch_size=self.mini_batch_size,
                                 causal=self.causal, max_start=0 if state is None else self.mini_batch_size - 1)
        if state is not None:
            state._assign(new, state.exec_mask)
        out = out.transpose(1, 2).reshape(B, T, D)
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


def _attention_then_ttt(self, x):
    """A TTT layer's attention sub-block: moshi's, then the TTT block (docs/contract.md §4)."""
    return self.seq_modeling_block(type(self)._sa_block(self, x))


def block_options(ttt: dict) -> dict:
    """`SeqModelingBlock` options from config.json's `"ttt"` block (tttjax's defaults)."""
    ttt = read_ttt_block(ttt, source="config.json")
    return dict(mini_batch_size=int(ttt["mini_batch_size"]), base_lr=float(ttt["base_lr"]),
                causal=bool(ttt["causal"]), initial_gating_alpha=float(ttt["initial_gating_alpha"]))


def check_config_streamable(ttt: dict) -> None:
    """`check_streamable` for a config.json `"ttt"` block, before any weights are read."""
    if ttt.get("enable"):
        options = block_options(ttt)
        check_streamable(options["causal"], options["mini_batch_size"])


def attach_ttt(lm, ttt: dict):
    """Insert TTT blocks into `lm`'s temporal layers as the `"ttt"` block of config.json says.

    Call it before `lm` first streams: moshi's StreamingModule caches the list of its streaming
    submodules on first use.
    """
    options = block_options(ttt)
    if not ttt.get("enable"):
        return lm
    layers = lm.transformer.layers
    num_heads = int(ttt.get("num_heads") or layers[0].self_attn.num_heads)
    for index in parse_ttt_layers(ttt.get("layers", "none"), len(layers)):
        layer = layers[index]
        layer.seq_modeling_block = SeqModelingBlock(lm.dim, num_heads, **options)
        layer._sa_block = types.MethodType(_attention_then_ttt, layer)
    return lm


def load_ttt_moshi(weights: str | Path, config: str | Path | Mapping, *, lora: str | Path | None = None,
                   device: str = "cpu", dtype=torch.float32):
    """A moshi LMModel with TTT layers and the weights of a tttjax export (strict load).

    weights: a full export (`consolidated.safetensors`), or the base weights when `lora` (an
    adapters-only `lora.safetensors`: LoRA A/B if config.json says `"lora": true`, and the TTT
    tensors) is given. config: the export's config.json, or its contents (a dict, as
    `json.load` returns it; not modified). The model is built on the meta device and takes the
    loaded tensors, so the weights are in memory once, not after a random initialisation.
    """
    from moshi.models import loaders
    from safetensors.torch import load_file

    if isinstance(config, Mapping):
        cfg, source = copy.deepcopy(dict(config)), "the config dict"
    elif isinstance(config, (str, os.PathLike)):
        cfg, source = read_json(Path(config)), str(config)
    else:
        raise TypeError(f"config: expected the path of a config.json or its contents as a dict, got "
                        f"{type(config).__name__}")
    ttt = cfg.pop("ttt", {}) or {}
    adapter_keys = {k: cfg.pop(k) for k in ("lora", "lora_rank", "lora_scaling") if k in cfg}
    if lora is not None and adapter_keys.get("lora"):
        if "lora_rank" not in adapter_keys:
            raise ValueError(f"{source}: a LoRA file needs lora_rank / lora_scaling in config.json")
        cfg.update(lora=True, lora_rank=adapter_keys["lora_rank"], lora_scaling=adapter_keys.get("lora_scaling", LORA_SCALING))
    lm = loaders.get_moshi_lm(None, lm_kwargs=cfg, device="meta", dtype=dtype)
    with torch.device("meta"):
        attach_ttt(lm, ttt)
    state = load_file(str(weights), device=str(device))
    if lora is not None:
        state.update(load_file(str(lora), device=str(device)))  # moshi's load hook maps X.weight -> X.frozen_W.weight
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    lm.load_state_dict(state, strict=True, assign=True)
    return lm.eval()
