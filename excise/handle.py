"""Model handles: one interface over a model, whichever library runs it.

A handle answers: which sites exist, how to read or patch an activation at a site, which tensor a
parameter site is, the per-token log-probability of target continuations for a batch, and every
layout question (which slice of a weight belongs to which neuron or head, which axis a weight
quantizer reduces over). ``locate``, ``edit`` and ``probes`` only talk to models through a handle
and never ask which backend it is.

:class:`ModelHandle` is the abstract base: it declares the whole protocol and implements what
backends share (hooks as context managers removed in ``finally`` - nothing is left behind after
an exception -, logits with hooks, losses, parameters, fingerprints, ``n_layers``, the edit
stack). ``TLHandle`` wraps a TransformerLens ``HookedTransformer`` (first-class backend; hooks
are forward hooks on its hook points); ``excise.hf.HFHandle`` any Hugging Face causal LM.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from excise.placement import devices_of, resolve_device, resolve_dtype
from excise.request import Fact
from excise.sites import SiteInfo, expand, layer_of, unit_of_param, unknown_site_error
from excise.world import Tokenizer

# fn(activation, site) -> new activation or None (modify in place / read only)
HookFn = Callable[[Tensor, str], Tensor | None]

# ModelHandle.check_fits: a text longer than this many characters per context position is
# counted on a prefix first (every tokenizer excise meets spends fewer characters per token)
_CHARS_PER_TOKEN = 16


@dataclass(frozen=True)
class Batch:
    """Facts encoded for one forward pass. Right padded; position ``j`` of ``target_mask`` is True
    when token ``j`` belongs to the target (its prediction is read from logits at ``j - 1``)."""

    tokens: Tensor  # [n, T] long
    target_mask: Tensor  # [n, T] bool
    subject_mask: Tensor  # [n, T] bool
    lengths: Tensor  # [n] long, real tokens incl. BOS

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, idx) -> "Batch":
        return Batch(self.tokens[idx], self.target_mask[idx], self.subject_mask[idx],
                     self.lengths[idx])

    def trim(self) -> "Batch":
        """The same rows without the padding columns no row needs (cut at the longest row)."""
        t = int(self.lengths.max())
        return Batch(self.tokens[:, :t], self.target_mask[:, :t], self.subject_mask[:, :t],
                     self.lengths)

    def chunks(self, size: int) -> Iterator["Batch"]:
        """Consecutive batches of ``size`` rows, each trimmed."""
        for i in range(0, len(self), size):
            yield self[i:i + size].trim()


def pad_batch(rows: Sequence[list[int]], tmask: Sequence[list[bool]],
              smask: Sequence[list[bool]], pad_id: int) -> Batch:
    """Right-pad token rows and their masks (each mask may be shorter than its row) into a
    Batch."""
    T = max(map(len, rows))
    n = len(rows)
    tokens = torch.full((n, T), pad_id, dtype=torch.long)
    tm = torch.zeros((n, T), dtype=torch.bool)
    sm = torch.zeros((n, T), dtype=torch.bool)
    for i, (r, a, b) in enumerate(zip(rows, tmask, smask)):
        tokens[i, :len(r)] = torch.tensor(r)
        tm[i, :len(a)] = torch.tensor(a, dtype=torch.bool)
        sm[i, :len(b)] = torch.tensor(b, dtype=torch.bool)
    return Batch(tokens, tm, sm, torch.tensor([len(r) for r in rows]))


def cut_to_last_position(module, args, kwargs=None):
    """Forward pre-hook (registered with or without ``with_kwargs``): the module's first
    input cut to the last position."""
    if kwargs is None:
        return (args[0][:, -1:],) + tuple(args[1:])
    if args:
        return (args[0][:, -1:],) + tuple(args[1:]), kwargs
    key = next(iter(kwargs))
    return args, {**kwargs, key: kwargs[key][:, -1:]}


@dataclass(frozen=True)
class Past:
    """Every block's attention keys and values for a batch of runs (:meth:`ModelHandle.kv_run`),
    in the backend's own layout; ``pos_dim`` is their position axis. ``past[rows]`` selects
    runs, ``past.upto(t)`` keeps positions ``< t``: what :meth:`ModelHandle.resume` continues
    from."""

    keys: tuple[Tensor, ...]  # one per block, [runs, ...]
    values: tuple[Tensor, ...]
    pos_dim: int

    def __len__(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        """Positions held."""
        return self.keys[0].shape[self.pos_dim]

    def __getitem__(self, rows) -> "Past":
        return Past(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values),
                    self.pos_dim)

    def upto(self, t: int) -> "Past":
        return Past(tuple(k.narrow(self.pos_dim, 0, t) for k in self.keys),
                    tuple(v.narrow(self.pos_dim, 0, t) for v in self.values), self.pos_dim)


def _head_sample(head: Tensor, n: int = 4096) -> Tensor:
    """About ``n`` evenly strided elements of an unembedding (all of a small one): a cheap
    identity check."""
    flat = head.detach().reshape(-1)
    return flat[::max(1, flat.numel() // n)].cpu().clone()


class _ReadoutLSE(torch.autograd.Function):
    """``logsumexp(h W^T + b)`` over the rows of ``W`` (``[V, d]``) and its gradient in ``h``
    (``softmax @ W``) from one chunked pass over ``W`` (:meth:`ModelHandle.readout_lse`)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: Tensor, bias: Tensor | None, chunk: int) -> Tensor:
        wide = torch.promote_types(head.dtype, torch.float32)
        h = hidden.detach().to(head.device, head.dtype)
        k = h.shape[0]
        m = torch.full((k,), -float("inf"), dtype=wide, device=head.device)
        total = torch.zeros(k, dtype=wide, device=head.device)
        acc = torch.zeros(h.shape, dtype=wide, device=head.device)
        for i in range(0, head.shape[0], chunk):
            w = head[i:i + chunk]
            z = (h @ w.T).to(wide)
            if bias is not None:
                z = z + bias[i:i + chunk].to(wide)
            m_new = torch.maximum(m, z.max(-1).values)
            scale = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            total = total * scale + e.sum(-1)
            acc = acc * scale[:, None] + e @ w.to(wide)
            m = m_new
        ctx.save_for_backward(acc / total[:, None])
        ctx.hidden_meta = (hidden.device, hidden.dtype)
        return (m + total.log()).to(hidden.device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (jac,) = ctx.saved_tensors
        device, dtype = ctx.hidden_meta
        return (grad.to(jac.device)[:, None] * jac).to(device, dtype), None, None, None


@dataclass(frozen=True)
class KLReference:
    """A reference model's statistics for ``KL(p_ref || p)`` at the target positions of a
    batch (:meth:`ModelHandle.kl_reference`): per position ``u = W_U p_ref`` and ``c = sum_v
    p_ref log p_ref - b . p_ref``; ``offsets[i]:offsets[i+1]`` are row ``i``'s positions."""

    u: Tensor  # [K, d_model] float64
    c: Tensor  # [K] float64
    offsets: Tensor  # [n + 1] long (CPU)
    head_sample: Tensor  # a strided sample of the unembedding it was taken through

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def take(self, rows) -> "KLReference":
        """The statistics of rows ``rows`` (in that order), as for ``batch[rows].trim()``."""
        rows = torch.as_tensor(rows).reshape(-1).tolist()
        idx = [torch.arange(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]
        ix = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        counts = torch.tensor([int(self.offsets[r + 1] - self.offsets[r]) for r in rows],
                              dtype=torch.long)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        return KLReference(self.u[ix.to(self.u.device)], self.c[ix.to(self.c.device)], offsets,
                           self.head_sample)

    def nbytes(self) -> int:
        return self.u.numel() * self.u.element_size() + self.c.numel() * self.c.element_size()

    def kl(self, hidden: Tensor, lse: Tensor) -> Tensor:
        """``KL(p_ref || p)`` at each position (``[K]``, float64) of a model whose final hidden
        states there are ``hidden`` ``[K, d_model]`` and whose ``logsumexp`` of the logits is
        ``lse`` ``[K]`` (same unembedding as the reference): ``c - h . u + lse``."""
        if hidden.shape[0] != self.u.shape[0] or lse.shape != hidden.shape[:1]:
            raise ValueError(f"KLReference.kl: {hidden.shape[0]} hidden states and "
                             f"{tuple(lse.shape)} logsumexp values for {self.u.shape[0]} "
                             f"reference positions; take the reference's rows of this batch "
                             f"(KLReference.take(rows))")
        hu = (hidden.double() * self.u.to(hidden.device, torch.float64)).sum(-1)
        return self.c.to(hidden.device) - hu + lse.double()


class ModelHandle(abc.ABC):
    """One interface over a model, whichever library runs it: everything ``locate``, ``edit``
    and ``probes`` may ask of a model is declared here.

    The base implements what every backend shares - site lookup, encoding (word tokenizers),
    hooks as context managers, logits with hooks, log-probabilities and losses, parameters and
    fingerprints, ``n_layers``, the edit stack. A backend provides only what differs (the
    abstract members): its site table, how a hook attaches to a site (:meth:`_attach`), the
    plain forward (:meth:`_forward`), ``run_with_cache``, ``readout``, ``clone``, the unit layout
    of its weights (:meth:`unit_axis`, :meth:`unit_out_weights`, :meth:`site_writers`), the axes a
    weight quantizer reduces over (:meth:`quant_axes`) and a functional per-example loss
    (:meth:`functional_loss`, or a ``ValueError`` saying it cannot).

    ``model`` is the backend's ``torch.nn.Module``; stages never touch it.
    """

    # True where every forward pass is a round trip to a server (excise.remote): methods then
    # prefer a few large forwards to many small ones
    remote: bool = False

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        # Edits applied to this handle, oldest first (``excise.edits`` keeps it LIFO)
        self.edit_stack: list = []
        self._table: dict[str, SiteInfo] | None = None

    # -- sites -------------------------------------------------------------------------------
    @abc.abstractmethod
    def site_table(self) -> dict[str, SiteInfo]:
        """Every site of the model, in model order: site name -> :class:`SiteInfo`."""

    def sites(self, pattern: str | Sequence[str] = "*", kind: str | None = None) -> list[str]:
        table = self.site_table()
        names = [n for n, i in table.items() if kind is None or i.kind == kind]
        return expand(pattern, names) if names else []

    def info(self, site: str) -> SiteInfo:
        table = self.site_table()
        if site not in table:
            raise unknown_site_error(site, list(table))
        return table[site]

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks: the blocks the site table names (``blocks.{L}.*``)."""
        return 1 + max((i.layer for i in self.site_table().values() if i.layer is not None),
                       default=-1)

    @property
    def d_vocab(self) -> int:
        """Number of logits per position (the unembedding's width)."""
        return int(self.readout()[1].shape[-1])

    @property
    def n_ctx(self) -> int | None:
        """The longest token sequence the model takes (its positions); None when unknown.
        :meth:`encode` refuses a fact longer than this."""
        return None

    # -- data -------------------------------------------------------------------------------
    def encode(self, facts: Sequence[Fact]) -> Batch:
        """``[BOS] + prompt tokens + target tokens``, right padded. A fact longer than the
        model's context (:attr:`n_ctx`) is refused before it is encoded whole."""
        if not facts:
            raise ValueError("cannot encode an empty list of facts")
        rows, tmask, smask = [], [], []
        for f in facts:
            self.check_fits(f.prompt + " " + f.target, self.tokenizer.encode, f.prompt)
            p = self.tokenizer.encode(f.prompt)
            t = self.tokenizer.encode(f.target)
            if not t:
                raise ValueError(f"fact {f.prompt!r} has an empty target")
            ids = [self.tokenizer.bos_id] + p + t
            self.check_length(len(ids), f.prompt)
            rows.append(ids)
            tmask.append([False] * (1 + len(p)) + [True] * len(t))
            s = [False] * len(ids)
            if f.subject:
                sub = self.tokenizer.encode(f.subject)
                for j in range(1, 1 + len(p) - len(sub) + 1):
                    if ids[j:j + len(sub)] == sub:
                        s[j:j + len(sub)] = [True] * len(sub)
                        break
            smask.append(s)
        return pad_batch(rows, tmask, smask, self.tokenizer.pad_id)

    def check_fits(self, text: str, tokenize: Callable[[str], list[int]],
                   name: str | None = None, kind: str = "fact") -> None:
        """Refuse ``text`` early when a prefix of it is already longer than the context: a
        text of more than ``16 * n_ctx`` characters is not tokenized whole before it is
        refused (a 10 MB prompt fails in milliseconds). Shorter texts, and long ones whose
        prefix fits, are checked exactly by :meth:`check_length` once tokenized."""
        n = self.n_ctx
        cut = _CHARS_PER_TOKEN * (n + 1) if n is not None else 0
        if n is None or len(text) <= cut:
            return
        head = text[:cut]
        end = max(head.rfind(" "), head.rfind("\n"))
        if end <= 0:  # one huge "word": no whole-word prefix to count
            return
        k = 1 + len(tokenize(head[:end]))
        if k > n:
            raise self._too_long(name if name is not None else text, k, n, kind, at_least=True)

    def check_length(self, n_tokens: int, name: str, kind: str = "fact") -> None:
        """Refuse a sequence of ``n_tokens`` (BOS included) longer than the context."""
        n = self.n_ctx
        if n is not None and n_tokens > n:
            raise self._too_long(name, n_tokens, n, kind)

    def _too_long(self, name: str, k: int, n: int, kind: str, at_least: bool = False
                  ) -> ValueError:
        start = name[:40] + ("..." if len(name) > 40 else "")
        what = "BOS, prompt and target" if kind == "fact" else "BOS and text"
        return ValueError(f"the {kind} {start!r} is {'at least ' if at_least else ''}{k:,} "
                          f"tokens long ({what}), but the model {self.name!r} takes at most "
                          f"{n:,} tokens (its context, n_ctx); shorten or split it")

    def encode_texts(self, texts: Sequence[str]) -> Batch:
        """Plain text for language-model loss: every token after BOS is a target."""
        facts = []
        for t in texts:
            self.check_fits(t, self.tokenizer.encode, t, "text")
            self.check_length(1 + len(self.tokenizer.encode(t)), t, "text")
            words = t.split()
            facts.append(Fact(words[0], " ".join(words[1:]) if len(words) > 1 else words[0]))
        b = self.encode(facts)
        mask = torch.arange(b.tokens.shape[1])[None, :] < b.lengths[:, None]
        mask[:, 0] = False
        mask[:, 1] = False
        return Batch(b.tokens, mask, b.subject_mask, b.lengths)

    # -- hooks ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _attach(self, site: str, fn: HookFn) -> RemovableHandle:
        """Hook-point resolution: register ``fn`` on the module that carries activation
        ``site`` (already checked to be an activation site) and return the torch handle."""

    def _hook(self, site: str, fn: HookFn) -> RemovableHandle:
        info = self.info(site)
        if info.kind == "param":
            raise ValueError(f"site {site!r} is a parameter; hooks need an activation site "
                             f"such as 'blocks.0.mlp.post'")
        if info.kind == "sae":
            raise ValueError(f"site {site!r} is an SAE site; hook its base site instead")
        return self._attach(site, fn)

    @contextlib.contextmanager
    def hooks(self, hooks: Mapping[str, HookFn]) -> Iterator[None]:
        """Hooks ``{site: fn}`` for the duration of the block; removed in ``finally``."""
        handles = []
        try:
            for site, fn in hooks.items():
                handles.append(self._hook(site, fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def add_persistent_hook(self, site: str, fn: HookFn) -> RemovableHandle:
        """Register a hook that stays until its returned handle's ``remove()`` is called."""
        return self._hook(site, fn)

    def hook_count(self) -> int:
        """Hooks of any kind registered on the model's modules (0 when nothing is left)."""
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                   for m in self.model.modules())

    # -- running ----------------------------------------------------------------------------
    @abc.abstractmethod
    def _forward(self, tokens: Tensor) -> Tensor:
        """The backend's own forward pass: ``[n, T]`` token ids (on the model's device) ->
        ``[n, T, vocab]`` logits, exactly as the source model computes them."""

    def logits(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        tokens = tokens.to(self.device)
        if not hooks:
            return self._forward(tokens)
        with self.hooks(hooks):
            return self._forward(tokens)

    @abc.abstractmethod
    def run_with_cache(self, tokens: Tensor, sites: Sequence[str]) -> dict[str, Tensor]:
        """Activations at ``sites`` (``attn.z`` as ``[batch, pos, heads, d_head]``); blocks
        past the last requested site need not run."""

    @abc.abstractmethod
    def kv_run(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None
               ) -> tuple[Tensor, Past]:
        """Logits ``[n, T, vocab]`` of a run (as :meth:`logits`, with ``hooks``) and every
        block's keys and values (:class:`Past`), from which :meth:`resume` continues it."""

    @abc.abstractmethod
    def _resume(self, past: Past, resid: Tensor, layer: int, hooks: Mapping[str, HookFn],
                stop: int | None, last_mlp: bool) -> Tensor:
        """Backend part of :meth:`resume` (arguments already checked). ``last_mlp``: run the
        last block's MLP at the last position only (its input cut to that position; what the
        MLP adds to the other positions' residual is never read)."""

    def resume(self, past: Past, resid: Tensor, layer: int,
               hooks: Mapping[str, HookFn] | None = None, stop: int | None = None) -> Tensor:
        """Continue runs from their keys and values: logits ``[m, vocab]`` at the last position,
        or with ``stop`` the residual stream leaving block ``stop - 1`` (``[m, q, d_model]``;
        blocks from ``stop`` on are not run).

        ``past`` (``m`` runs, ``t`` positions, from :meth:`kv_run`) holds what the attention of
        every block reads at positions ``< t``; ``resid`` ``[m, q, d_model]`` is the residual
        stream entering block ``layer`` at positions ``t .. t+q-1``. Blocks before ``layer``
        are not run (the caller vouches that ``resid`` and ``past`` are what they produced), so
        a run changed only at position ``t`` and above ``layer`` costs ``q`` positions of the
        blocks from ``layer`` on. Without ``stop``, only the last position leaves the last block
        (its MLP runs there alone) unless a hook reads or writes the last block's MLP or its
        output. ``hooks`` see positions ``t ..`` only; hooks at ``embed`` or at sites of blocks
        outside ``layer .. stop - 1`` are refused (those never run). Equal to the full run up to
        float rounding."""
        hooks = dict(hooks or {})
        n = self.n_layers
        if not (isinstance(layer, int) and 0 <= layer < n):
            raise ValueError(f"resume: layer must be an int in [0, {n}), got {layer!r}")
        end = n if stop is None else stop
        if not (isinstance(end, int) and layer < end <= n):
            raise ValueError(f"resume: stop must be an int in ({layer}, {n}], got {stop!r}")
        if resid.dim() != 3 or resid.shape[0] != len(past) or resid.shape[1] < 1:
            raise ValueError(f"resume: resid has shape {tuple(resid.shape)}; expected "
                             f"[{len(past)} runs, positions >= 1, d_model]")
        outside = [s for s in hooks
                   if self.info(s).layer is None or not layer <= self.info(s).layer < end]
        if outside:
            raise ValueError(f"resume: a hook at {outside[0]!r} would never run (running "
                             f"blocks {layer} to {end - 1}); hook sites of those blocks")
        before_mlp = ("resid_pre", "resid_mid", "attn.z", "attn.out")
        last_mlp = stop is None and resid.shape[1] > 1 and not any(
            self.info(s).layer == n - 1 and not s.endswith(before_mlp) for s in hooks)
        return self._resume(past, resid.to(self.device), layer, hooks, stop, last_mlp)

    def token_logprobs(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        """Log-probability of each next token: ``[n, T-1]`` (zero where not a target)."""
        logits = self.logits(batch.tokens, hooks)  # [n, T, V]
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        out = lp.gather(-1, batch.tokens[:, 1:, None].to(lp.device)).squeeze(-1)
        return out * batch.target_mask[:, 1:].to(lp.device)

    def target_logprobs(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None
                        ) -> Tensor:
        """Log-probabilities over the whole vocabulary at each position that predicts a target
        token: ``[k, V]``, ``k`` = number of targets, rows in row-major order of the mask."""
        logits = self.logits(batch.tokens, hooks)[:, :-1]
        return torch.log_softmax(logits[batch.target_mask[:, 1:].to(logits.device)].float(), -1)

    # -- the readout at target positions only (losses on facts, the KL on text) --------------
    # True where the backend offers target_hidden / unembed with logits affine in the final
    # hidden state (no soft-capping): then kl_reference / kl_to_reference give the exact KL to a
    # reference model from statistics computed once (no reference forward per step)
    affine_readout: bool = False

    def target_hidden(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        """The final hidden state (after the final norm: what the unembedding reads) at each
        position that predicts a target token: ``[k, d_model]``, rows in row-major order of the
        mask, as :meth:`target_logprobs`. ``log_softmax(unembed(target_hidden(b)))`` is
        ``target_logprobs(b)``. ``ValueError`` where the backend has no such path."""
        raise ValueError(f"target_hidden: the {type(self).__name__} backend has no readout at "
                         f"target positions only; use target_logprobs")

    def unembed(self, hidden: Tensor) -> Tensor:
        """Logits (float32 or wider) of final hidden states ``[..., d_model]`` from
        :meth:`target_hidden`: the unembedding, its bias and any logit soft-capping, exactly as
        the model's own forward applies them. ``ValueError`` where the backend has none."""
        raise ValueError(f"unembed: the {type(self).__name__} backend has no readout at target "
                         f"positions only; use target_logprobs")

    @torch.no_grad()
    def kl_reference(self, batch: Batch, chunk: int = 16, positions: int = 64
                     ) -> "KLReference":
        """What ``KL(p_self || p_other)`` at the target positions of ``batch`` needs of this
        model, computed once (``chunk`` rows per forward, ``positions`` per unembedding): per
        position, with ``p`` this
        model's next-token distribution and logits ``z = h W_U + b``, the vector ``u = W_U p``
        (``[d_model]``) and the scalar ``c = sum_v p log p - b . p``. Then for any model with
        the same unembedding (:meth:`kl_to_reference`) ``KL = c - h . u + logsumexp(h W_U +
        b)``: exact, with a ``d_model`` vector per position instead of a vocabulary-sized
        distribution, and no forward of this model at each training step. Needs
        :attr:`affine_readout` (no logit soft-capping), and the model the KL is later taken of
        must have this unembedding (a sample of its elements is compared)."""
        self._need_affine("kl_reference")
        head = self._unembedding_matrix()  # [V, d_model]
        bias = self._unembedding_bias()
        hidden = torch.cat([self.target_hidden(b) for b in batch.chunks(chunk)])
        us, cs = [], []
        for h in hidden.split(positions):  # a few passes over the unembedding, not one per row
            # in float64: p must sum to 1 to well below float32's rounding of the logsumexp
            # (KL = c - h.u + lse would carry the shift times the logits' size, ~1e-3)
            lp = torch.log_softmax(self.unembed(h).double(), -1)  # [k, V]
            p = lp.exp()
            # u in float64: KL = c - h.u + lse cancels terms as large as the logits (Gemma's
            # final hidden states are large), so h.u needs more than float32's digits
            u = torch.zeros(h.shape[0], head.shape[1], dtype=torch.float64, device=p.device)
            for i in range(0, head.shape[0], 16384):
                u += p[:, i:i + 16384].double() @ head[i:i + 16384].to(p.device).double()
            us.append(u)
            c = (p * lp).sum(-1)
            if bias is not None:
                c = c - p @ bias.double()
            cs.append(c)
        offsets = torch.zeros(len(batch) + 1, dtype=torch.long)
        offsets[1:] = batch.target_mask[:, 1:].sum(1).cumsum(0).cpu()
        return KLReference(torch.cat(us), torch.cat(cs), offsets, _head_sample(head))

    def kl_to_reference(self, batch: Batch, ref: "KLReference",
                        hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        """``KL(p_reference || p_self)`` of the next-token distributions at the target
        positions of ``batch``, averaged over those positions (``F.kl_div(..., log_target=True,
        reduction="batchmean")`` of the two models' :meth:`target_logprobs`, computed as
        :meth:`kl_reference` says). ``ref``: the reference's statistics for exactly these rows
        (``KLReference.take``); differentiable in this model's weights."""
        self._need_affine("kl_to_reference")
        if not torch.equal(_head_sample(self._unembedding_matrix()), ref.head_sample):
            raise ValueError(f"kl_to_reference: the model {self.name!r} has another unembedding "
                             f"than the reference the statistics were taken of; they hold only "
                             f"for the same unembedding (compare target_logprobs instead)")
        h = self.target_hidden(batch, hooks)
        if h.shape[0] != ref.u.shape[0]:
            raise ValueError(f"kl_to_reference: the batch has {h.shape[0]} target positions, "
                             f"the reference statistics {ref.u.shape[0]}; take the reference's "
                             f"rows of this batch (KLReference.take(rows))")
        lse = torch.logsumexp(self.unembed(h), -1)
        return ref.kl(h, lse).mean().to(lse.dtype)

    def readout_lse(self, hidden: Tensor, chunk: int = 8192) -> Tensor:
        """``logsumexp`` over the vocabulary of ``unembed(hidden)`` (``[K]``, float32 or
        wider) in one pass over the unembedding: per chunk of ``chunk`` tokens the logits, a
        running maximum and sum, and the softmax-weighted sum of the unembedding's rows - which
        is the gradient with respect to ``hidden`` - at once, so the backward reads nothing
        again and no ``[K, vocabulary]`` tensor is kept. Differentiable in ``hidden`` only: the
        unembedding is taken as constant (not for training it). Needs :attr:`affine_readout`;
        equal to ``torch.logsumexp(unembed(hidden), -1)`` up to float rounding."""
        self._need_affine("readout_lse")
        return _ReadoutLSE.apply(hidden, self._unembedding_matrix(), self._unembedding_bias(),
                                 chunk)

    def readout_logit(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """``unembed(hidden)[k, tokens[k]]`` for each row ``k`` (``[K]``) without the other
        logits; differentiable in ``hidden``. Needs :attr:`affine_readout`."""
        self._need_affine("readout_logit")
        head = self._unembedding_matrix()
        tokens = tokens.to(head.device)
        out = (hidden.to(head.device, head.dtype) * head[tokens]).sum(-1)
        bias = self._unembedding_bias()
        if bias is not None:
            out = out + bias[tokens]
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def _need_affine(self, what: str) -> None:
        if not self.affine_readout:
            raise ValueError(f"{what}: needs logits affine in the final hidden state "
                             f"(affine_readout); the {type(self).__name__} model {self.name!r} "
                             f"has none (no target-position readout, or logit soft-capping): "
                             f"compare target_logprobs of the two models instead")

    def linear_module(self, site: str) -> torch.nn.Linear | None:
        """The ``torch.nn.Linear`` whose ``weight`` is parameter ``site`` (``y = x W^T + b``,
        ``W`` ``[out, in]``), when the backend runs it as one; None otherwise (the base class,
        TransformerLens' einsum layouts). What lets a trainer add a small trainable delta to
        some rows or columns of it instead of training the whole matrix."""
        return None

    def _unembedding_matrix(self) -> Tensor:
        """``[V, d_model]``: the unembedding as :meth:`unembed` applies it (detached)."""
        return self.readout()[1].T

    def _unembedding_bias(self) -> Tensor | None:
        return self.readout()[2]

    def loss(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None,
             per_example: bool = False) -> Tensor:
        """Mean negative log-likelihood of target tokens (per example or over the batch)."""
        lp = self.token_logprobs(batch, hooks)
        m = batch.target_mask[:, 1:].to(lp.device)
        if per_example:
            return -(lp.sum(1) / m.sum(1).clamp(min=1))
        return -lp.sum() / m.sum().clamp(min=1)

    @abc.abstractmethod
    def functional_loss(self) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
        """``loss(params, tokens, target_mask)``: the mean negative log-likelihood of one
        example's target tokens (``tokens``, ``target_mask``: ``[T]``) as a pure function of
        ``params`` (parameter site -> tensor; every other weight fixed, detached), for
        ``torch.func.grad`` / ``vmap`` (per-example gradients). ``ValueError`` where the backend
        cannot run functionally."""

    @abc.abstractmethod
    def readout(self) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
        """The logit lens: ``(final_norm, W_U [d_model, vocab], b_U [vocab])`` - the final
        norm as a function of ``[..., d_model]`` residuals, and the unembedding (detached)."""

    # -- parameters -------------------------------------------------------------------------
    def parameter(self, site: str) -> torch.nn.Parameter:
        info = self.info(site)
        if info.kind != "param":
            raise ValueError(f"site {site!r} is an {info.kind} site, not a parameter "
                             f"(parameter sites look like 'blocks.0.mlp.W_in')")
        return self.model.get_parameter(info.target)

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Parameter site -> parameter, in model order (tied weights once)."""
        return {s: self.model.get_parameter(i.target) for s, i in self.site_table().items()
                if i.kind == "param"}

    def fingerprint(self) -> str:
        """Hash of every parameter's bytes: equal fingerprints mean identical weights."""
        h = hashlib.sha256()
        for name, p in sorted(self.named_parameters().items()):
            h.update(name.encode())
            # the bytes hashed where they lie (no copy of the tensor)
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
        return h.hexdigest()[:16]

    def check_finite(self, stage: str = "") -> None:
        """Raise ``ValueError`` naming every parameter that holds NaN or inf (a corrupt file,
        a diverged training run, an overflowing edit): a model with one NaN weight gives
        recalls of 0.0 and perplexity NaN that look like a finished run. One reduction per
        parameter (a few milliseconds on the organism); ``stage`` prefixes the message."""
        bad = []
        with torch.no_grad():
            for site, p in self.named_parameters().items():
                if not p.is_floating_point() or p.is_meta:
                    continue
                if torch.isfinite(p.sum()):  # a sum of finite values may still overflow:
                    continue  # only then is each element looked at
                fin = torch.isfinite(p)
                if bool(fin.all()):
                    continue
                n_nan = int(torch.isnan(p).sum())
                first = tuple(int(i) for i in torch.nonzero(~fin)[0])
                bad.append(f"{site} holds {n_nan:,} NaN and {int((~fin).sum()) - n_nan:,} inf "
                           f"of {p.numel():,} values (first at {list(first)})")
        if bad:
            more = f" (and {len(bad) - 3} more parameters)" if len(bad) > 3 else ""
            raise ValueError(f"{stage + ': ' if stage else ''}the weights of model "
                             f"{self.name!r} are not finite: {'; '.join(bad[:3])}{more}. A "
                             f"corrupt weights file or a diverged training run; reload or "
                             f"retrain the model")

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.named_parameters().values())

    @property
    def device(self) -> torch.device:
        """Where input tokens go: the device of the token embedding (for a model sharded with a
        ``device_map``, the first shard's). Everything else follows the tensor it meets."""
        return self._embedding_weight().device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' floating dtype (the token embedding's)."""
        return self._embedding_weight().dtype

    @property
    def devices(self) -> list[torch.device]:
        """Every device that holds a parameter (more than one for a sharded model)."""
        return devices_of(self.model)

    def _embedding_weight(self) -> Tensor:
        return next(self.model.parameters())

    def to(self, device: "str | torch.device | None" = None,
           dtype: "str | torch.dtype | None" = None) -> "ModelHandle":
        """Move the model to ``device`` (``"auto"``: a GPU when present) and/or cast its weights
        to ``dtype`` (``"bfloat16"``, ...), in place; returns the handle. ``None`` leaves either
        as it is. Edits applied before the move keep their saved values and revert exactly."""
        dev, dt = resolve_device(device), resolve_dtype(dtype)
        if dev is not None and self._sharded():
            raise ValueError(f"model {self.name!r} is sharded (on "
                             f"{', '.join(map(str, self.devices))}); it cannot be moved to "
                             f"{dev} as a whole - load it again with that device")
        if dev is not None:
            self._move(dev)
        if dt is not None:
            self._move(dt)
        return self

    def _move(self, where: "torch.device | torch.dtype") -> None:
        self.model.to(where)

    def _sharded(self) -> bool:
        return len(self.devices) > 1

    @abc.abstractmethod
    def clone(self) -> "ModelHandle":
        """An independent copy (weights copied, no hooks, no edits)."""

    # -- unit layout: which slice of a weight belongs to which neuron / head -----------------
    @abc.abstractmethod
    def unit_axis(self, site: str) -> tuple[str, int] | tuple[str, int, int] | None:
        """The neuron / head a parameter belongs to, and its axis, in this backend's layout.
        A third entry, when present, is a group size: unit ``i`` owns elements
        ``i*group .. (i+1)*group - 1`` along the axis (attention weights flat over heads).
        None: no such unit."""

    def unit_axes(self, sites) -> dict[str, list | None]:
        """``{param site: [unit site, axis(, group)] or None}`` - stored in Importance metadata
        so that ``Importance.by_unit`` aggregates along the right axis for any backend."""
        out = {}
        for s in sites:
            if self.info(s).kind == "param":
                hit = self.unit_axis(s)
                out[s] = list(hit) if hit else None
        return out

    @abc.abstractmethod
    def unit_out_weights(self, site: str) -> Tensor:
        """What each unit writes into the residual stream, in TransformerLens layout whatever
        the backend: ``[d_mlp, d_model]`` (``W_out``) for ``blocks.L.mlp.post``, ``[n_heads,
        d_head, d_model]`` (``W_O``) for ``blocks.L.attn.z``. Detached."""

    @abc.abstractmethod
    def site_writers(self, site: str) -> tuple[tuple[str, int, bool], ...]:
        """The parameters whose affine map produces activation ``site`` (``blocks.L.mlp.out``,
        ``blocks.L.attn.out``, ``embed``): ``(param site, its d_model axis, adds a constant)``.
        A linear map on the site can be folded into them (``edit.project(bake=True)``); a
        constant goes into the entries marked True (a bias, or every embedding row).
        ``ValueError`` (naming why) where this backend cannot."""

    @abc.abstractmethod
    def quant_axes(self, site: str) -> tuple[int, ...] | None:
        """The axes of parameter ``site`` a per-channel weight quantizer reduces over (one
        scale per slice along the remaining axis: a weight matrix's input axis, so each output
        channel gets its own scale). None: a parameter weight quantization leaves alone
        (biases, norms)."""

    def _unit_site_error(self, site: str) -> ValueError:
        return ValueError(f"unit_out_weights: {site!r} is not a neuron site "
                          f"('blocks.L.mlp.post') or a head site ('blocks.L.attn.z')")

    def _writers(self, site: str, out_axis: int) -> tuple[tuple[str, int, bool], ...]:
        """:meth:`site_writers` from site names: ``W_out`` / ``W_O`` (their d_model axis is
        ``out_axis``) and the output bias when the model has one; every embedding row."""
        L = layer_of(site)
        table = self.site_table()
        if site == "embed":
            return (("embed.W_E", -1, True),)
        for short, w, b in (("mlp.out", "mlp.W_out", "mlp.b_out"),
                            ("attn.out", "attn.W_O", "attn.b_O")):
            if L is not None and site == f"blocks.{L}.{short}":
                out = [(f"blocks.{L}.{w}", out_axis, False)]
                return tuple(out + ([(f"blocks.{L}.{b}", 0, True)]
                                    if f"blocks.{L}.{b}" in table else []))
        raise ValueError(f"{site!r} is not written by one layer's weights; those sites end in "
                         f"'mlp.out' or 'attn.out', or are 'embed'")


class TLHandle(ModelHandle):
    """Handle over a TransformerLens ``HookedTransformer``. Parameter sites are its parameter
    names; weights are in TransformerLens layout (``W_in`` ``[d_model, d_mlp]``, ``W_out``
    ``[d_mlp, d_model]``, ``W_Q`` ``[n_heads, d_model, d_head]``, ``W_O``
    ``[n_heads, d_head, d_model]``)."""

    _ACTIVATIONS = {
        "resid_pre": "blocks.{L}.hook_resid_pre",
        "resid_mid": "blocks.{L}.hook_resid_mid",
        "resid_post": "blocks.{L}.hook_resid_post",
        "attn.z": "blocks.{L}.attn.hook_z",
        "attn.out": "blocks.{L}.hook_attn_out",
        "mlp.pre": "blocks.{L}.mlp.hook_pre",
        "mlp.post": "blocks.{L}.mlp.hook_post",
        "mlp.out": "blocks.{L}.hook_mlp_out",
    }

    def __init__(self, model, tokenizer: Tokenizer, name: str = ""):
        super().__init__(model, tokenizer, name)

    @property
    def cfg(self):
        """The ``HookedTransformerConfig`` (TransformerLens users' convenience)."""
        return self.model.cfg

    def _embedding_weight(self) -> Tensor:
        return self.model.embed.W_E

    def _move(self, where: "torch.device | torch.dtype") -> None:
        # TransformerLens keeps cfg.device / cfg.dtype in step with the weights
        self.model.to(where, print_details=False)

    @property
    def n_ctx(self) -> int:
        """Positions of the model (``cfg.n_ctx``): the rows of its positional embedding."""
        return int(self.model.cfg.n_ctx)

    def site_table(self) -> dict[str, SiteInfo]:
        if self._table is None:
            c = self.model.cfg
            t: dict[str, SiteInfo] = {"embed": SiteInfo("embed", "activation", "hook_embed",
                                                        (c.d_model,), None)}
            dims = {"attn.z": (c.n_heads,), "mlp.pre": (c.d_mlp,), "mlp.post": (c.d_mlp,)}
            for L in range(c.n_layers):
                for short, hook in self._ACTIVATIONS.items():
                    name = f"blocks.{L}.{short}"
                    t[name] = SiteInfo(name, "activation", hook.format(L=L),
                                       dims.get(short, (c.d_model,)), L)
            for name, p in self.model.named_parameters():
                t[name] = SiteInfo(name, "param", name, tuple(p.shape), layer_of(name))
            self._table = t
        return self._table

    def _attach(self, site: str, fn: HookFn) -> RemovableHandle:
        def hook(module, inputs, output):
            new = fn(output, site)
            return output if new is None else new
        return self.model.hook_dict[self.info(site).target].register_forward_hook(hook)

    def _forward(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, return_type="logits")

    def run_with_cache(self, tokens: Tensor, sites: Sequence[str]) -> dict[str, Tensor]:
        """Activations at ``sites`` (no logits computed past the last needed block)."""
        store: dict[str, Tensor] = {}

        def grab(x, site):
            store[site] = x

        stop = max((self.info(s).layer or 0) for s in sites) + 1
        hooks = {s: grab for s in sites}
        with self.hooks(hooks):
            self.model(tokens.to(self.device), stop_at_layer=stop)
        return store

    def kv_run(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None
               ) -> tuple[Tensor, Past]:
        """TransformerLens' own key/value cache, filled by the run (an all-ones attention mask:
        no token counts as padding)."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        tokens = tokens.to(self.device)
        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.device,
                                                        tokens.shape[0])
        with self.hooks(hooks or {}):
            logits = self.model(tokens, return_type="logits", past_kv_cache=cache,
                                attention_mask=torch.ones_like(tokens))
        return logits, Past(tuple(e.past_keys for e in cache.entries),
                            tuple(e.past_values for e in cache.entries), pos_dim=1)

    def _resume(self, past: Past, resid: Tensor, layer: int, hooks: Mapping[str, HookFn],
                stop: int | None, last_mlp: bool) -> Tensor:
        """``start_at_layer`` / ``stop_at_layer`` with a frozen cache holding ``past``; with
        ``last_mlp`` a pre-hook on the last block's ``mlp`` keeps the last position."""
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        if self.model.cfg.positional_embedding_type == "shortformer":
            raise ValueError("TLHandle.resume: shortformer positional embeddings are not "
                             "supported (blocks read them beside the residual)")
        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, self.device, len(past))
        for entry, k, v in zip(cache.entries, past.keys, past.values):
            entry.past_keys, entry.past_values = k, v
        cache.previous_attention_mask = torch.ones(len(past), past.length, dtype=torch.int,
                                                   device=self.device)
        cache.freeze()
        last = self.model.blocks[-1]
        cut = (last.mlp.register_forward_pre_hook(cut_to_last_position)
               if last_mlp and hasattr(last, "mlp") else None)
        try:
            with self.hooks(hooks):
                out = self.model(resid, return_type="logits", start_at_layer=layer,
                                 stop_at_layer=stop, past_kv_cache=cache)
        finally:
            if cut is not None:
                cut.remove()
        return out if stop is not None else out[:, -1]

    def functional_loss(self) -> Callable[[dict[str, Tensor], Tensor, Tensor], Tensor]:
        from torch.func import functional_call

        module = self.model
        detached = {k: v.detach() for k, v in module.named_parameters()}
        target = {s: i.target for s, i in self.site_table().items() if i.kind == "param"}

        def loss_one(params: dict[str, Tensor], tokens: Tensor, target_mask: Tensor) -> Tensor:
            full = dict(detached)
            full.update({target[s]: v for s, v in params.items()})
            one = tokens[None]
            logits = functional_call(module, full, (one,), {"return_type": "logits"})
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, one[:, 1:, None])[..., 0]
            m = target_mask[None][:, 1:]
            return -(lp * m).sum() / m.sum().clamp(min=1)

        return loss_one

    def readout(self) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
        u = self.model.unembed
        norm = getattr(self.model, "ln_final", None)  # (absent without normalization)
        return (norm if norm is not None else (lambda x: x)), u.W_U.detach(), u.b_U.detach()

    def clone(self) -> "TLHandle":
        return TLHandle(copy.deepcopy(self.model), self.tokenizer, self.name)

    def unit_axis(self, site: str) -> tuple[str, int] | None:
        """TransformerLens layouts: :data:`excise.sites.PARAM_UNITS`."""
        return unit_of_param(site)

    def unit_out_weights(self, site: str) -> Tensor:
        L = layer_of(site)
        if site == f"blocks.{L}.mlp.post":
            return self.parameter(f"blocks.{L}.mlp.W_out").detach()
        if site == f"blocks.{L}.attn.z":
            return self.parameter(f"blocks.{L}.attn.W_O").detach()
        raise self._unit_site_error(site)

    def site_writers(self, site: str) -> tuple[tuple[str, int, bool], ...]:
        return self._writers(site, -1)

    def quant_axes(self, site: str) -> tuple[int, ...] | None:
        """Weight matrices (``W_*``, two or more axes): one scale per token row for
        ``W_E`` / ``W_pos`` (reduce over ``d_model``), one per entry of the last axis (the
        output unit) for every other weight. Biases and norms: None."""
        info = self.info(site)
        last = site.split(".")[-1]
        if info.kind != "param" or len(info.unit_shape) < 2 or not last.startswith("W_"):
            return None
        keep = 0 if last in ("W_E", "W_pos") else len(info.unit_shape) - 1
        return tuple(i for i in range(len(info.unit_shape)) if i != keep)
