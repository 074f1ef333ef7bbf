"""The optimizer schedule and the loss against PyTorch references (torch OneCycleLR, F.cross_entropy)."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_reference as ref

from tttjax.objective import loss_terms, objective
from tttjax.train import optimizer as optim_lib
from tttjax.weights.pytorch import load_pytorch


@pytest.mark.parametrize("total,pct", [(2000, 0.05), (37, 0.3), (10, 0.5)])
def test_one_cycle_matches_torch(total, pct):
    """LR and beta1 per step equal torch's OneCycleLR with moshi-finetune's arguments.

    The schedule is evaluated in fp32 (1 + cos(pi t) cancels near the end), so the LR is compared
    to 1e-5 relative or 1e-6 of the peak LR absolute, whichever is larger."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2e-6, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-6, total_steps=total, pct_start=pct)
    lr_fn = optim_lib.one_cycle_lr(2e-6, total, pct)
    b1_fn = optim_lib.one_cycle_beta1(total, pct)
    for step in range(total):
        group = opt.param_groups[0]
        np.testing.assert_allclose(float(lr_fn(step)), group["lr"], rtol=1e-5, atol=1e-6 * 2e-6)
        np.testing.assert_allclose(float(b1_fn(step)), group["betas"][0], rtol=1e-5)
        opt.step()
        sched.step()


def test_param_groups_by_path():
    assert optim_lib.param_group(("ttt", "ttt", "W1")) == "ttt"
    assert optim_lib.param_group(("ttt", "gating_alpha")) == "gate"
    # A base param whose name merely contains "ttt" or "gating" is not a TTT param.
    assert optim_lib.param_group(("transformer", "gating", "linear_in", "lora_a")) == "base"


def test_group_lr_multipliers_scale_updates():
    """With multipliers 1 / 3 / 0, the first Adam step of each group moves by lr * multiplier."""
    optim = ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0.0, pct_start=0.5, b1=0.9, b2=0.95, eps=1e-12,
                                           max_norm=1e9, cycle_momentum=False, ttt_lr_multiplier=3.0,
                                           gate_lr_multiplier=0.0))
    params = {"base": jnp.ones(3), "ttt": jnp.ones(3), "gate": jnp.ones(3)}
    tx = optim_lib.make_optimizer(optim, 4, {"base": "base", "ttt": "ttt", "gate": "gate"})
    updates, _ = tx.update(jax_tree_full(params, 0.5), tx.init(params), params)
    lr0 = float(optim_lib.one_cycle_lr(1e-2, 4, 0.5)(0))
    np.testing.assert_allclose(np.asarray(updates["base"]), -lr0, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(updates["ttt"]), -3 * lr0, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(updates["gate"]), 0.0)


def test_clipped_adamw_matches_torch():
    """Six steps of clipping + AdamW + OneCycle (LR and beta1) equal torch's clip_grad_norm_ +
    AdamW + OneCycleLR, moshi-finetune's loop, with some steps clipped (grad norm up to 3 > 1)
    and some not (0.3). fp32 on both sides: params agree to 1e-6 relative."""
    optim = ml_collections.ConfigDict(dict(lr=1e-2, weight_decay=0.1, pct_start=0.3, b1=0.9, b2=0.95, eps=1e-8,
                                           max_norm=1.0, cycle_momentum=True, ttt_lr_multiplier=1.0,
                                           gate_lr_multiplier=1.0))
    rng = np.random.default_rng(0)
    init = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    grads = []
    for scale in (3.0, 0.3, 2.0, 0.3, 1.5, 0.1):
        g = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in init.items()}
        norm = np.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
        grads.append({k: x * np.float32(scale / norm) for k, x in g.items()})

    tx = optim_lib.make_optimizer(optim, 6, {"a": "base", "b": "base"})
    params = {k: jnp.asarray(v) for k, v in init.items()}
    opt_state = tx.init(params)
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    opt = torch.optim.AdamW(torch_params.values(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=6, pct_start=0.3)
    for g in grads:
        updates, opt_state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, opt_state, params)
        params = {k: params[k] + updates[k] for k in params}
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(g[k].copy())
        torch.nn.utils.clip_grad_norm_(torch_params.values(), 1.0)
        opt.step()
        sched.step()
        for k, p in torch_params.items():
            np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=1e-6, atol=1e-7)


def jax_tree_full(tree, value):
    return {k: jnp.full_like(v, value) for k, v in tree.items()}


def moshi_finetune_loss(out, codes, first_cb_mult, pad_weight):
    """moshi-finetune's `compute_loss_with_mask` (finetune/loss.py), written with torch ops."""
    def one(logits, target, mask, mode):
        target = torch.where(mask, target, torch.zeros_like(target))
        weights = mask.float()
        if mode == "audio":
            weights[:, 0] *= first_cb_mult
        else:
            for pad in (3, 0):
                weights[target == pad] *= pad_weight
        logits = logits.reshape(-1, logits.size(-1)).float()
        loss = F.cross_entropy(torch.nan_to_num(logits), target.reshape(-1), reduction="none")
        loss = torch.where(mask.reshape(-1), loss, torch.zeros_like(loss))
        return torch.sum(loss * weights.reshape(-1)) / torch.sum(weights)

    text = one(out.text_logits, codes[:, :1], out.text_mask, "text")
    audio = one(out.logits, codes[:, 1:9], out.mask, "audio")
    return (text + audio).item(), text.item(), audio.item()


def test_loss_matches_moshi_finetune(tmp_path):
    """The training loss (delayed-frame `predictions`, same weights) equals moshi-finetune's loss on
    moshi's own undelayed logits; rtol 1e-5 covers the ~2e-6 logit differences of the parity test."""
    kwargs = ref.lm_kwargs()
    lm = ref.build_lm(kwargs)
    codes = ref.random_codes(kwargs, batch=2, frames=10)
    codes[0, 0, :4] = [3, 0, 3, 3]  # text pads get their own weight
    codes[1, 3, 2] = -1  # a missing audio token mid-sequence
    with torch.no_grad():
        out = lm(torch.from_numpy(codes))
    want = moshi_finetune_loss(out, torch.from_numpy(codes), 100.0, 0.5)
    model = load_pytorch(ref.save_safetensors(tmp_path / "w.safetensors", ref.state_dict_numpy(lm)),
                         ref.save_config(tmp_path / "config.json", kwargs))
    terms = loss_terms(model.predictions(jnp.asarray(codes)), text_padding_weight=0.5,
                       first_codebook_weight_multiplier=100.0)
    assert float(terms["audio_count"].sum()) == float(out.mask.sum())
    assert float(terms["text_count"]) == float(out.text_mask.sum())
    got = [float(x) for x in objective(terms)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
