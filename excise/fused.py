"""A fused forward pass of GPT-2-style TransformerLens models, for training loops.

TransformerLens runs every component through hook points and einsums; a training loop that
needs nothing but the logits (the fine-tuning attacks of ``probes.attacks``, the distillation
of ``edit.distill``) pays for that at every step. :func:`fused_forward` computes the same
function with fused torch ops (layer_norm, batched-matmul attention, addmm) and only what
the wanted logits depend on: given ``keep`` positions, each row up to its last kept position
(causal attention: nothing later feeds it), the rows packed so the per-position layers compute
no padding (attention alone runs on the padded grid), and the last block, final norm and
unembedding at the kept positions only. Same numbers to float precision (checked against the
handle's logits when it is built; tests/test_attacks_batched.py, tests/test_edit_remove.py).

``ENGINES``: "serial" (through the handle: TransformerLens, hooks and all) or "fused" (this
module); :func:`engine_for` returns the fused forward where it applies and None where the
serial path must run (another handle or architecture, hooks attached, logits that differ).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from excise.handle import Batch, ModelHandle, TLHandle

ENGINES = ("serial", "fused")

# TransformerLens configuration the fused forward reproduces (any other value: serial path)
_CFG = {"normalization_type": "LN", "positional_embedding_type": "standard",
        "attn_only": False, "parallel_attn_mlp": False, "n_key_value_heads": None,
        "gated_mlp": False, "use_local_attn": False, "final_rms": False,
        "scale_attn_by_inverse_layer_idx": False, "use_split_qkv_input": False,
        "use_attn_result": False, "use_hook_mlp_in": False, "attn_types": None,
        "use_normalization_before_and_after": False, "original_architecture": None,
        "attention_dir": "causal", "use_qk_norm": False, "post_embedding_ln": False,
        "output_logits_soft_cap": -1.0, "attn_scores_soft_cap": -1.0}
_ACT = {"gelu": F.gelu, "relu": F.relu}
_BLOCK_PARAMS = ("ln1.w", "ln1.b", "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "attn.b_Q",
                 "attn.b_K", "attn.b_V", "attn.b_O", "ln2.w", "ln2.b", "mlp.W_in", "mlp.b_in",
                 "mlp.W_out", "mlp.b_out")

FusedForward = Callable[..., Tensor]  # (params, tokens, hooks=None, keep=None) -> logits


def fused_forward(model: ModelHandle, check: Tensor | None = None) -> FusedForward | None:
    """``logits(params, tokens, hooks)`` of ``model`` computed with fused torch ops, or None
    where that would not be the model's own computation: a handle other than a plain
    :class:`TLHandle` (subclasses may change what the model computes), forward hooks attached,
    a configuration other than a GPT-2-style TransformerLens model (LayerNorm, learned positions,
    gelu / relu MLP, full causal attention scaled by sqrt(d_head)), other parameters, or - given
    ``check`` tokens - logits that differ from the handle's there by more than float noise.
    ``params``: parameter site -> tensor (the handle's ``named_parameters()``: gradients flow to
    them); ``hooks``: only ``blocks.{L}.resid_post`` sites, ``fn(x, site)`` as the handle's.
    ``keep``: ``[B, T]`` bool, the positions whose logits are wanted; the logits are then
    ``[n_kept, V]`` (in row-major order) and only the positions some kept position depends on
    are computed: in each row the prefix up to its last kept position (causal attention: nothing
    later feeds it), packed into ``[n, d]`` rows for the per-position layers (no padded
    positions; attention alone runs on the padded ``[B, T]`` grid), and the last block computes
    its attention output, MLP, final norm and unembedding at the kept positions only - the same
    numbers for a fraction of the arithmetic. A hook then sees those packed rows ``[n, d]``
    (without ``keep``: ``[B, T, d]``, as the handle's)."""
    if type(model) is not TLHandle or model.hook_count():
        return None
    tl = model.model
    if any(mod._forward_hooks or mod._forward_pre_hooks for mod in tl.modules()):
        return None
    c = tl.cfg
    if any(getattr(c, k, v) != v for k, v in _CFG.items()) or c.act_fn not in _ACT:
        return None
    if not c.use_attn_scale or abs(c.attn_scale - math.sqrt(c.d_head)) > 1e-9:
        return None
    names = {"embed.W_E", "pos_embed.W_pos", "ln_final.w", "ln_final.b", "unembed.W_U",
             "unembed.b_U"} | {f"blocks.{L}.{n}" for L in range(c.n_layers) for n in _BLOCK_PARAMS}
    params = dict(tl.named_parameters())
    if set(params) != names or any(p.dtype != torch.float32 for p in params.values()):
        return None
    act, H, dh, d, eps = _ACT[c.act_fn], c.n_heads, c.d_head, c.d_model, c.eps
    resid_sites = {f"blocks.{L}.resid_post": L for L in range(c.n_layers)}

    def forward(P: Mapping[str, Tensor], tokens: Tensor, hooks=None,
                keep: Tensor | None = None) -> Tensor:
        at: dict[int, tuple[str, Callable]] = {}
        for site, fn in (hooks or {}).items():
            if site not in resid_sites:
                raise ValueError(f"the fused forward takes hooks at {sorted(resid_sites)} only; "
                                 f"got {site!r} (use engine='serial')")
            at[resid_sites[site]] = (site, fn)
        dev = P["embed.W_E"].device
        tokens = tokens.to(dev)
        B, T = tokens.shape
        pos = torch.arange(T, device=dev)
        flat = cut = None  # packed rows of the [B, T] grid; the kept ones among them
        if keep is None:
            x = (P["embed.W_E"][tokens] + P["pos_embed.W_pos"][:T]).reshape(B * T, d)
        else:
            keep = keep.to(dev)
            end = torch.where(keep, pos, -1).amax(1) if B and T else pos.new_full((B,), -1)
            T = max(1, int(end.max()) + 1 if B else 1)  # drop what follows every last kept one
            tokens, keep, pos = tokens[:, :T], keep[:, :T], pos[:T]
            flat = (pos <= end[:, None]).reshape(-1).nonzero()[:, 0]
            cut = keep.reshape(-1)[flat].nonzero()[:, 0]
            x = (F.embedding(tokens.reshape(-1)[flat], P["embed.W_E"])
                 + F.embedding(flat % T, P["pos_embed.W_pos"]))
        last = c.n_layers - 1 if cut is not None and c.n_layers - 1 not in at else None
        causal = None if T > _MATH_ATTENTION_MAX_T else \
            torch.full((T, T), float("-inf"), dtype=x.dtype, device=dev).triu_(1)
        for L in range(c.n_layers):
            p = f"blocks.{L}."
            h = F.layer_norm(x, (d,), P[p + "ln1.w"], P[p + "ln1.b"], eps)
            W = torch.cat([P[p + "attn.W_Q"], P[p + "attn.W_K"], P[p + "attn.W_V"]])
            b = torch.cat([P[p + "attn.b_Q"], P[p + "attn.b_K"], P[p + "attn.b_V"]])
            qkv = torch.addmm(b.reshape(-1), h, W.permute(1, 0, 2).reshape(d, 3 * H * dh))
            if flat is not None:  # onto the [B, T] grid (zeros where nothing is computed)
                qkv = qkv.new_zeros(B * T, 3 * H * dh).index_copy_(0, flat, qkv)
            q, k, v = qkv.view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
            z = _causal_attention(q, k, v, 1 / c.attn_scale, causal)
            z = z.transpose(1, 2).reshape(B * T, H * dh)
            if flat is not None:
                z = z.index_select(0, flat)
            if L == last:  # only the kept positions from here on
                z, x = z.index_select(0, cut), x.index_select(0, cut)
            x = x + torch.addmm(P[p + "attn.b_O"], z, P[p + "attn.W_O"].reshape(H * dh, d))
            h = F.layer_norm(x, (d,), P[p + "ln2.w"], P[p + "ln2.b"], eps)
            u = act(torch.addmm(P[p + "mlp.b_in"], h, P[p + "mlp.W_in"]))
            x = x + torch.addmm(P[p + "mlp.b_out"], u, P[p + "mlp.W_out"])
            if L in at:
                site, fn = at[L]
                new = fn(x if flat is not None else x.view(B, T, d), site)
                x = x if new is None else new.reshape(x.shape)
        if cut is not None and last is None:  # a hook on the last block saw every position
            x = x.index_select(0, cut)
        h = F.layer_norm(x, (d,), P["ln_final.w"], P["ln_final.b"], eps)
        logits = torch.addmm(P["unembed.b_U"], h, P["unembed.W_U"])
        return logits if keep is not None else logits.view(B, T, -1)

    if check is not None:
        with torch.no_grad():
            want = model.logits(check)
            got = forward(model.named_parameters(), check.to(want.device))
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + float(want.abs().max()))):
            return None
    return forward


# Up to this many positions attention runs as two batched matmuls and a softmax; beyond, torch's
# scaled_dot_product_attention. At the organism's lengths (its context holds 32 positions; its
# training rows at most 18 tokens) the explicit form's forward and backward took half the time
# of the CPU flash kernel (B 64, 8 heads, T 28, d_head 32: 4.6 against 9.1 ms, one layer, two
# threads) - the kernel's blocking pays off on long rows.
_MATH_ATTENTION_MAX_T = 64


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float,
                      causal: Tensor | None) -> Tensor:
    """Causal softmax attention of ``[B, H, T, d_head]`` queries, keys and values: with
    ``causal`` (the ``[T, T]`` additive mask, -inf above the diagonal) as explicit batched
    matmuls, else through ``scaled_dot_product_attention``. The same function either way."""
    if causal is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    B, H, T, dh = q.shape
    scores = torch.baddbmm(causal.expand(B * H, T, T), q.reshape(B * H, T, dh),
                           k.reshape(B * H, T, dh).transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(-1), v.reshape(B * H, T, dh)).view(B, H, T, dh)


def fused_loss(forward: FusedForward, params: Mapping[str, Tensor], batch: Batch,
                hooks=None) -> Tensor:
    """The handle's ``loss(batch)`` (mean NLL of the target tokens) through ``forward``."""
    logits, tok = target_logits(forward, params, batch.trim(), hooks)
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None]).sum()
    return nll / batch.target_mask[:, 1:].sum().clamp(min=1).item()


def target_logits(forward: FusedForward, params: Mapping[str, Tensor], b: Batch,
                   hooks=None) -> tuple[Tensor, Tensor]:
    """The logits at the positions that predict a target token ``[n, V]`` (row-major order)
    and those target tokens ``[n]``: the last block runs at those positions only."""
    keep = torch.zeros_like(b.target_mask)
    keep[:, :-1] = b.target_mask[:, 1:]
    logits = forward(params, b.tokens, hooks, keep)
    return logits, b.tokens[:, 1:][b.target_mask[:, 1:]].to(logits.device)


def fused_token_logprobs(forward: FusedForward, params: Mapping[str, Tensor], batch: Batch,
                         hooks=None) -> Tensor:
    """The handle's ``token_logprobs(batch)`` through ``forward`` (the logits at the target
    positions only): ``[n, T'-1]`` with ``T'`` the batch's trimmed length, each target token's
    log-probability, zero elsewhere."""
    b = batch.trim()
    logits, tok = target_logits(forward, params, b, hooks)
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None])[:, 0]
    out = torch.zeros(b.target_mask[:, 1:].shape, dtype=lp.dtype, device=lp.device)
    out[b.target_mask[:, 1:].to(lp.device)] = lp
    return out


@torch.no_grad()
def fused_hits(forward: FusedForward, params: Mapping[str, Tensor], batch: Batch,
                hooks=None, batch_size: int = 256) -> Tensor:
    """``fact_hits`` through ``forward``: per fact, whether the greedy continuation is the
    target (``[n]`` bool)."""
    out = torch.zeros(len(batch), dtype=torch.bool)
    for i in range(0, len(batch), batch_size):
        b = batch[i:i + batch_size].trim()
        logits, tok = target_logits(forward, params, b, hooks)
        ok = torch.ones(b.target_mask[:, 1:].shape, dtype=torch.bool, device=tok.device)
        ok[b.target_mask[:, 1:].to(tok.device)] = logits.argmax(-1) == tok
        out[i:i + len(b)] = ok.all(1).cpu()
    return out


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`, else a ValueError naming the choices."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {list(ENGINES)}")
    return engine


def engine_for(m: ModelHandle, engine: str, data: Batch) -> FusedForward | None:
    """The fused forward of ``m`` when ``engine`` asks for it and it applies (checked against
    the handle's logits on a few rows of ``data``), else None: the serial path."""
    if check_engine(engine) == "serial" or not len(data):
        return None
    return fused_forward(m, data[:8].trim().tokens)
