"""Model handles: one interface over a model, whichever library runs it.

A handle answers: which sites exist, how to read or patch an activation at a site, which tensor a
parameter site is, and the per-token log-probability of target continuations for a batch.
``locate``, ``edit`` and ``probes`` only talk to models through a handle.

``TLHandle`` wraps a TransformerLens ``HookedTransformer`` (first-class backend). Hooks are plain
PyTorch forward hooks on TransformerLens hook points, registered inside context managers that
remove them in ``finally`` - nothing is left behind after an exception.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from excise.sites import SiteInfo, expand, layer_of, unknown_site_error
from excise.world import Fact, Tokenizer

# fn(activation, site) -> new activation or None (modify in place / read only)
HookFn = Callable[[Tensor, str], Tensor | None]


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

    def chunks(self, size: int) -> Iterator["Batch"]:
        for i in range(0, len(self), size):
            b = self[i:i + size]
            t = int(b.lengths.max())
            yield Batch(b.tokens[:, :t], b.target_mask[:, :t], b.subject_mask[:, :t], b.lengths)


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


class ModelHandle:
    """Backend-independent part of a handle. Subclasses provide the site table and hooks."""

    tokenizer: Tokenizer
    name: str

    # -- sites -------------------------------------------------------------------------------
    def site_table(self) -> dict[str, SiteInfo]:
        raise NotImplementedError

    def sites(self, pattern: str | Sequence[str] = "*", kind: str | None = None) -> list[str]:
        table = self.site_table()
        names = [n for n, i in table.items() if kind is None or i.kind == kind]
        return expand(pattern, names) if names else []

    def info(self, site: str) -> SiteInfo:
        table = self.site_table()
        if site not in table:
            raise unknown_site_error(site, list(table))
        return table[site]

    # -- data -------------------------------------------------------------------------------
    def encode(self, facts: Sequence[Fact]) -> Batch:
        if not facts:
            raise ValueError("cannot encode an empty list of facts")
        rows, tmask, smask = [], [], []
        for f in facts:
            p = self.tokenizer.encode(f.prompt)
            t = self.tokenizer.encode(f.target)
            if not t:
                raise ValueError(f"fact {f.prompt!r} has an empty target")
            ids = [self.tokenizer.bos_id] + p + t
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

    def encode_texts(self, texts: Sequence[str]) -> Batch:
        """Plain text for language-model loss: every token after BOS is a target."""
        facts = []
        for t in texts:
            words = t.split()
            facts.append(Fact(words[0], " ".join(words[1:]) if len(words) > 1 else words[0]))
        b = self.encode(facts)
        mask = torch.arange(b.tokens.shape[1])[None, :] < b.lengths[:, None]
        mask[:, 0] = False
        mask[:, 1] = False
        return Batch(b.tokens, mask, b.subject_mask, b.lengths)

    # -- running ----------------------------------------------------------------------------
    def logits(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        raise NotImplementedError

    def token_logprobs(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        """Log-probability of each next token: ``[n, T-1]`` (zero where not a target)."""
        logits = self.logits(batch.tokens, hooks)  # [n, T, V]
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        out = lp.gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
        return out * batch.target_mask[:, 1:]

    def target_logprobs(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None
                        ) -> Tensor:
        """Log-probabilities over the whole vocabulary at each position that predicts a target
        token: ``[k, V]``, ``k`` = number of targets, rows in row-major order of the mask."""
        logits = self.logits(batch.tokens, hooks)[:, :-1]
        return torch.log_softmax(logits[batch.target_mask[:, 1:].to(logits.device)].float(), -1)

    def loss(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None,
             per_example: bool = False) -> Tensor:
        """Mean negative log-likelihood of target tokens (per example or over the batch)."""
        lp = self.token_logprobs(batch, hooks)
        m = batch.target_mask[:, 1:]
        if per_example:
            return -(lp.sum(1) / m.sum(1).clamp(min=1))
        return -lp.sum() / m.sum().clamp(min=1)

    def parameter(self, site: str) -> torch.nn.Parameter:
        raise NotImplementedError

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {s: self.parameter(s) for s in self.sites(kind="param")}

    @contextlib.contextmanager
    def hooks(self, hooks: Mapping[str, HookFn]) -> Iterator[None]:
        raise NotImplementedError
        yield

    def add_persistent_hook(self, site: str, fn: HookFn):
        """Register a hook that stays until its returned handle's ``remove()`` is called."""
        raise NotImplementedError

    def hook_count(self) -> int:
        raise NotImplementedError

    def unit_axis(self, site: str) -> tuple[str, int] | tuple[str, int, int] | None:
        """The neuron / head a parameter belongs to, and its axis, in this backend's layout
        (TransformerLens layouts here; ``HFHandle`` overrides it). A third entry, when present,
        is a group size: unit ``i`` owns elements ``i*group .. (i+1)*group - 1`` along the axis
        (attention weights flat over heads). None: no such unit."""
        from excise.sites import unit_of_param

        return unit_of_param(site)

    def unit_out_weights(self, site: str) -> Tensor:
        """What each unit writes into the residual stream, in TransformerLens layout whatever
        the backend: ``[d_mlp, d_model]`` (``W_out``) for ``blocks.L.mlp.post``, ``[n_heads,
        d_head, d_model]`` (``W_O``) for ``blocks.L.attn.z``. Detached."""
        L = layer_of(site)
        if site == f"blocks.{L}.mlp.post":
            return self.parameter(f"blocks.{L}.mlp.W_out").detach()
        if site == f"blocks.{L}.attn.z":
            return self.parameter(f"blocks.{L}.attn.W_O").detach()
        raise ValueError(f"unit_out_weights: {site!r} is not a neuron site "
                         f"('blocks.L.mlp.post') or a head site ('blocks.L.attn.z')")

    def site_writers(self, site: str) -> tuple[tuple[str, int, bool], ...]:
        """The parameters whose affine map produces activation ``site`` (``blocks.L.mlp.out``,
        ``blocks.L.attn.out``, ``embed``): ``(param site, its d_model axis, adds a constant)``.
        A linear map on the site can be folded into them (``edit.project(bake=True)``); a
        constant goes into the entries marked True (a bias, or every embedding row).
        ``ValueError`` (naming why) where this backend cannot."""
        L = layer_of(site)
        table = self.site_table()
        if site == "embed":
            return (("embed.W_E", -1, True),)
        for short, w, b in (("mlp.out", "mlp.W_out", "mlp.b_out"),
                            ("attn.out", "attn.W_O", "attn.b_O")):
            if L is not None and site == f"blocks.{L}.{short}":
                out = [(f"blocks.{L}.{w}", -1, False)]
                return tuple(out + ([(f"blocks.{L}.{b}", 0, True)]
                                    if f"blocks.{L}.{b}" in table else []))
        raise ValueError(f"{site!r} is not written by one layer's weights; those sites end in "
                         f"'mlp.out' or 'attn.out', or are 'embed'")

    def readout(self) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
        """The logit lens: ``(final_norm, W_U [d_model, vocab], b_U [vocab])`` - the final
        norm as a function of ``[..., d_model]`` residuals, and the unembedding (detached)."""
        raise NotImplementedError(f"{type(self).__name__} has no readout()")

    def unit_axes(self, sites) -> dict[str, list | None]:
        """``{param site: [unit site, axis(, group)] or None}`` - stored in Importance metadata so that
        ``Importance.by_unit`` aggregates along the right axis for any backend."""
        out = {}
        for s in sites:
            if self.info(s).kind == "param":
                hit = self.unit_axis(s)
                out[s] = list(hit) if hit else None
        return out

    def fingerprint(self) -> str:
        """Hash of every parameter's bytes: equal fingerprints mean identical weights."""
        h = hashlib.sha256()
        for name, p in sorted(self.named_parameters().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.named_parameters().values())

    def clone(self) -> "ModelHandle":
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(iter(self.named_parameters().values())).device


class TLHandle(ModelHandle):
    """Handle over a TransformerLens ``HookedTransformer``."""

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
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self._table: dict[str, SiteInfo] | None = None
        self._sae: dict[str, object] = {}

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        return self.model.cfg.n_layers

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
            for site, sae in self._sae.items():
                t[site] = SiteInfo(site, "sae", site, (sae.cfg.d_sae,), layer_of(site))
            self._table = t
        return self._table

    def parameter(self, site: str) -> torch.nn.Parameter:
        info = self.info(site)
        if info.kind != "param":
            raise ValueError(f"site {site!r} is an {info.kind} site, not a parameter "
                             f"(parameter sites look like 'blocks.0.mlp.W_in')")
        return self.model.get_parameter(site)

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def _hook_point(self, site: str):
        info = self.info(site)
        if info.kind == "param":
            raise ValueError(f"site {site!r} is a parameter; hooks need an activation site "
                             f"such as 'blocks.0.mlp.post'")
        if info.kind == "sae":
            raise ValueError(f"site {site!r} is an SAE site; hook its base site instead")
        return self.model.hook_dict[info.target]

    def _wrap(self, site: str, fn: HookFn):
        def hook(module, inputs, output):
            new = fn(output, site)
            return output if new is None else new
        return hook

    @contextlib.contextmanager
    def hooks(self, hooks: Mapping[str, HookFn]) -> Iterator[None]:
        handles = []
        try:
            for site, fn in hooks.items():
                handles.append(self._hook_point(site).register_forward_hook(self._wrap(site, fn)))
            yield
        finally:
            for h in handles:
                h.remove()

    def add_persistent_hook(self, site: str, fn: HookFn):
        return self._hook_point(site).register_forward_hook(self._wrap(site, fn))

    def hook_count(self) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                   for m in self.model.modules())

    def logits(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        tokens = tokens.to(self.device)
        if not hooks:
            return self.model(tokens, return_type="logits")
        with self.hooks(hooks):
            return self.model(tokens, return_type="logits")

    def readout(self) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
        u = self.model.unembed
        return self.model.ln_final, u.W_U.detach(), u.b_U.detach()

    def clone(self) -> "TLHandle":
        return TLHandle(copy.deepcopy(self.model), self.tokenizer, self.name)

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
