"""Hugging Face causal LMs as excise model handles (``HFHandle``), under the one site grammar.

Supported families (``FAMILIES``; ``model.config.model_type`` picks one):

==========  ====================================================  ==============================
family      model types                                           block modules
==========  ====================================================  ==============================
gpt2        gpt2                                                  ``transformer.h.{L}``
gpt_neox    gpt_neox (Pythia)                                     ``gpt_neox.layers.{L}``
llama       llama, mistral, qwen2, qwen3, gemma, gemma2,          ``model.layers.{L}``
            gemma3_text (Gemma 3 270M)
==========  ====================================================  ==============================

Activation sites (what each carries, per family):

- ``embed``: token embeddings (the embedding module's output; Gemma's is already scaled by
  sqrt(d_model)); ``blocks.{L}.resid_pre`` / ``resid_post``: the block's input / output.
- ``blocks.{L}.attn.z``: the input of the attention output projection (``c_proj`` / ``dense`` /
  ``o_proj``), reshaped to ``[batch, pos, n_heads, d_head]``.
- ``blocks.{L}.attn.out`` / ``mlp.out``: what the sub-block adds to the residual stream - the
  attention / MLP module output, or for Gemma 2/3 (which normalise after each sub-block) the
  output of ``post_attention_layernorm`` / ``post_feedforward_layernorm``.
- ``blocks.{L}.mlp.pre``: pre-activations (``c_fc`` / ``dense_h_to_4h`` output; for gated MLPs
  the ``gate_proj`` output, like TransformerLens' ``hook_pre``).
- ``blocks.{L}.mlp.post``: the neuron activations (``act`` output; for gated MLPs the input to
  ``down_proj``, ``act_fn(gate) * up``).

``resid_mid`` has no module boundary in Hugging Face blocks and is not offered.

Parameter sites use TransformerLens names mapped to Hugging Face parameters
(``HFHandle.site_table()[site].target`` is the HF name), e.g. ``blocks.{L}.mlp.W_out`` ->
``model.layers.{L}.mlp.down_proj.weight``; gated MLPs have ``mlp.W_gate`` (gate_proj), ``mlp.W_in``
(up_proj), ``mlp.W_out`` (down_proj). **Layouts are the Hugging Face ones, not TransformerLens'**:
``nn.Linear`` weights are ``[out, in]`` (``mlp.W_out`` of Llama/Gemma is ``[d_model, d_mlp]``,
TransformerLens' is ``[d_mlp, d_model]``), attention weights are flat over heads
(``attn.W_Q`` is ``[n_heads * d_head, d_model]``, not ``[n_heads, d_model, d_head]``), and GPT-2's
``Conv1D`` weights are ``[in, out]`` with Q, K, V fused into ``attn.W_QKV`` (GPT-NeoX fuses them
too, interleaved per head). :meth:`HFHandle.unit_axis` gives the neuron / head slice of a weight,
:meth:`HFHandle.unit_out_weights` what each unit writes in TransformerLens layout.
A parameter no rule maps keeps its HF name under ``hf.`` (``hf.<name>``). Tied unembeddings
(GPT-2, Gemma) are one tensor, listed once as ``embed.W_E``.

Mechanics. ``hooks()`` / ``add_persistent_hook()`` are plain PyTorch forward (pre-)hooks on the
HF modules, removed in ``finally`` (or by the returned handle): edits that must persist, and
gradient methods that need the activation on the autograd path, use these. ``run_with_cache``
reads activations with nnsight tracing (``nnsight.NNsight`` over the same module; the trace stops
after the last requested site). ``logits`` is the HF forward itself (``use_cache=False``), so a
handle's logits are the source model's logits. The model is put in eval mode; its weights are
never processed.
"""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from excise.handle import Batch, HookFn, ModelHandle, Past, cut_to_last_position, pad_batch
from excise.placement import check_device_map, resolve_device, resolve_dtype
from excise.request import Fact
from excise.sites import SiteInfo, layer_of

# execution order of the activation sites inside one block (nnsight reads them in order)
_ORDER = ("resid_pre", "attn.z", "attn.out", "mlp.pre", "mlp.post", "mlp.out", "resid_post")


@dataclass(frozen=True)
class Variant:
    """How some model types of a family differ from it (``Family.variants``)."""

    acts: dict[str, tuple[str, str]] = field(default_factory=dict)  # overrides Family.acts
    block_params: tuple[tuple[str, str], ...] | None = None  # replaces Family.block_params
    # each sub-block's output is normalised before it is added to the residual stream, so
    # ``attn.out`` / ``mlp.out`` are not affine in the block's weights
    post_norm: bool = False


@dataclass(frozen=True)
class Family:
    """How one model family's modules and parameters map to excise sites."""

    name: str
    model_types: tuple[str, ...]
    blocks: str  # module path of the block list
    embed: str  # token-embedding module
    # short site -> (module path relative to the block, "output" | "input")
    acts: dict[str, tuple[str, str]]
    # (regex on the HF parameter name relative to the block or the root, site suffix)
    block_params: tuple[tuple[str, str], ...]
    root_params: tuple[tuple[str, str], ...]
    gated: bool = False
    # weights are stored [in, out] (GPT-2's Conv1D, the TransformerLens layout), not [out, in]
    conv1d: bool = False
    notes: str = ""
    variants: dict[str, Variant] = field(default_factory=dict)  # model_type -> differences


_LLAMA_BLOCK_PARAMS = (
    (r"input_layernorm\.weight", "ln1.w"),
    (r"self_attn\.q_proj\.weight", "attn.W_Q"), (r"self_attn\.q_proj\.bias", "attn.b_Q"),
    (r"self_attn\.k_proj\.weight", "attn.W_K"), (r"self_attn\.k_proj\.bias", "attn.b_K"),
    (r"self_attn\.v_proj\.weight", "attn.W_V"), (r"self_attn\.v_proj\.bias", "attn.b_V"),
    (r"self_attn\.o_proj\.weight", "attn.W_O"), (r"self_attn\.o_proj\.bias", "attn.b_O"),
    (r"self_attn\.q_norm\.weight", "attn.q_norm.w"),
    (r"self_attn\.k_norm\.weight", "attn.k_norm.w"),
    (r"mlp\.gate_proj\.weight", "mlp.W_gate"), (r"mlp\.up_proj\.weight", "mlp.W_in"),
    (r"mlp\.down_proj\.weight", "mlp.W_out"),
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "gpt2", ("gpt2",), "transformer.h", "transformer.wte",
        {"resid_pre": ("", "input"), "resid_post": ("", "output"),
         "attn.z": ("attn.c_proj", "input"), "attn.out": ("attn", "output"),
         "mlp.pre": ("mlp.c_fc", "output"), "mlp.post": ("mlp.act", "output"),
         "mlp.out": ("mlp", "output")},
        ((r"ln_1\.weight", "ln1.w"), (r"ln_1\.bias", "ln1.b"),
         (r"attn\.c_attn\.weight", "attn.W_QKV"), (r"attn\.c_attn\.bias", "attn.b_QKV"),
         (r"attn\.c_proj\.weight", "attn.W_O"), (r"attn\.c_proj\.bias", "attn.b_O"),
         (r"ln_2\.weight", "ln2.w"), (r"ln_2\.bias", "ln2.b"),
         (r"mlp\.c_fc\.weight", "mlp.W_in"), (r"mlp\.c_fc\.bias", "mlp.b_in"),
         (r"mlp\.c_proj\.weight", "mlp.W_out"), (r"mlp\.c_proj\.bias", "mlp.b_out")),
        ((r"transformer\.wte\.weight", "embed.W_E"),
         (r"transformer\.wpe\.weight", "pos_embed.W_pos"),
         (r"transformer\.ln_f\.weight", "ln_final.w"), (r"transformer\.ln_f\.bias", "ln_final.b"),
         (r"lm_head\.weight", "unembed.W_U")),
        conv1d=True,
        notes="Conv1D weights are [in, out] (the TransformerLens layout); Q, K, V fused",
    ),
    "gpt_neox": Family(
        "gpt_neox", ("gpt_neox",), "gpt_neox.layers", "gpt_neox.embed_in",
        {"resid_pre": ("", "input"), "resid_post": ("", "output"),
         "attn.z": ("attention.dense", "input"), "attn.out": ("attention", "output"),
         "mlp.pre": ("mlp.dense_h_to_4h", "output"), "mlp.post": ("mlp.act", "output"),
         "mlp.out": ("mlp", "output")},
        ((r"input_layernorm\.weight", "ln1.w"), (r"input_layernorm\.bias", "ln1.b"),
         (r"post_attention_layernorm\.weight", "ln2.w"),
         (r"post_attention_layernorm\.bias", "ln2.b"),
         (r"attention\.query_key_value\.weight", "attn.W_QKV"),
         (r"attention\.query_key_value\.bias", "attn.b_QKV"),
         (r"attention\.dense\.weight", "attn.W_O"), (r"attention\.dense\.bias", "attn.b_O"),
         (r"mlp\.dense_h_to_4h\.weight", "mlp.W_in"), (r"mlp\.dense_h_to_4h\.bias", "mlp.b_in"),
         (r"mlp\.dense_4h_to_h\.weight", "mlp.W_out"), (r"mlp\.dense_4h_to_h\.bias", "mlp.b_out")),
        ((r"gpt_neox\.embed_in\.weight", "embed.W_E"),
         (r"gpt_neox\.final_layer_norm\.weight", "ln_final.w"),
         (r"gpt_neox\.final_layer_norm\.bias", "ln_final.b"),
         (r"(embed_out|lm_head)\.weight", "unembed.W_U")),
        notes="nn.Linear weights are [out, in]; Q, K, V fused and interleaved per head",
    ),
    "llama": Family(
        "llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
        "model.layers", "model.embed_tokens",
        {"resid_pre": ("", "input"), "resid_post": ("", "output"),
         "attn.z": ("self_attn.o_proj", "input"), "attn.out": ("self_attn", "output"),
         "mlp.pre": ("mlp.gate_proj", "output"), "mlp.post": ("mlp.down_proj", "input"),
         "mlp.out": ("mlp", "output")},
        _LLAMA_BLOCK_PARAMS + ((r"post_attention_layernorm\.weight", "ln2.w"),),
        ((r"model\.embed_tokens\.weight", "embed.W_E"), (r"model\.norm\.weight", "ln_final.w"),
         (r"lm_head\.weight", "unembed.W_U")),
        gated=True,
        notes="nn.Linear weights are [out, in]; gated MLP (W_gate, W_in = up, W_out = down)",
        # Gemma 2/3 normalise each sub-block's output before adding it to the residual, and
        # have four norms per block (TransformerLens' ln1, ln1_post, ln2, ln2_post)
        variants={t: Variant(
            acts={"attn.out": ("post_attention_layernorm", "output"),
                  "mlp.out": ("post_feedforward_layernorm", "output")},
            block_params=_LLAMA_BLOCK_PARAMS + (
                (r"post_attention_layernorm\.weight", "ln1_post.w"),
                (r"pre_feedforward_layernorm\.weight", "ln2.w"),
                (r"post_feedforward_layernorm\.weight", "ln2_post.w")),
            post_norm=True) for t in ("gemma2", "gemma3_text")},
    ),
}


def supported() -> dict[str, tuple[str, ...]]:
    """Family name -> the ``config.model_type`` values it covers."""
    return {f.name: f.model_types for f in FAMILIES.values()}


def family_of(model) -> Family:
    """The :class:`Family` of a Hugging Face model; ``ValueError`` listing the supported ones."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if mt in fam.model_types:
            return fam
    listing = "; ".join(f"{f.name}: {', '.join(f.model_types)}" for f in FAMILIES.values())
    raise ValueError(f"HFHandle: unsupported architecture {type(model).__name__} "
                     f"(config.model_type={mt!r}). Supported families (model types): {listing}. "
                     f"TransformerLens-supported models can use excise.TLHandle instead.")


class HFTokenizer:
    """A Hugging Face tokenizer with the bits of :class:`excise.world.Tokenizer` the rest of excise
    uses (``len``, ``digest()``, ``encode``/``decode``, ``bos_id``/``pad_id``/``eos_id``); any other
    attribute is the wrapped tokenizer's (``.hf`` is the tokenizer itself)."""

    def __init__(self, hf):
        self.hf = hf
        self._digest: str | None = None

    def __getattr__(self, name):
        if name == "hf":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __call__(self, *args, **kwargs):
        return self.hf(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id if self.hf.bos_token_id is not None else self.hf.eos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int:
        if self.hf.pad_token_id is not None:
            return self.hf.pad_token_id
        return self.hf.eos_token_id or 0

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.hf.decode(ids)

    def digest(self) -> str:
        """Hash of the vocabulary (token -> id): equal digests mean the same token ids."""
        if self._digest is None:
            import hashlib

            h = hashlib.sha256()
            for tok, i in sorted(self.hf.get_vocab().items(), key=lambda kv: kv[1]):
                h.update(f"{i}\x00{tok}\x01".encode())
            self._digest = h.hexdigest()[:16]
        return self._digest


class HFHandle(ModelHandle):
    """Handle over a Hugging Face causal LM (``AutoModelForCausalLM``).

    ``tokenizer``: a Hugging Face tokenizer (fast tokenizers give subject masks from character
    offsets); may be None when only token ids are used (then ``encode`` raises).
    ``on_split``: what to do when a target tokenizes differently after its prompt than the
    prompt's and the target's own tokens joined (``"warn"`` - the default -, ``"raise"``,
    ``"ignore"``); the handle always feeds prompt tokens followed by the target's own tokens.
    """

    def __init__(self, model, tokenizer=None, name: str = "", on_split: str = "warn"):
        if on_split not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_split={on_split!r}: choose 'warn', 'raise' or 'ignore'")
        self.family = family_of(model)
        self.variant = self.family.variants.get(model.config.model_type, Variant())
        if tokenizer is not None and not isinstance(tokenizer, HFTokenizer):
            tokenizer = HFTokenizer(tokenizer)
        super().__init__(model.eval(), tokenizer,
                         name or getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.on_split = on_split
        self._modules: dict[str, tuple[torch.nn.Module, str]] = {}
        self._nn = None
        self._warned: set[tuple[str, str]] = set()
        self._cache_kw: str | None = None
        self._check_modules()

    def _embedding_weight(self) -> Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def device_map(self) -> dict | None:
        """The accelerate ``device_map`` the model was dispatched with (None: not sharded)."""
        return getattr(self.model, "hf_device_map", None)

    def _sharded(self) -> bool:
        return self.device_map is not None  # accelerate's hooks place every module

    # -- structure --------------------------------------------------------------------------
    def _n_blocks(self) -> int:
        """The length of the block list (builds the site table; ``n_layers`` reads the table)."""
        return len(self.model.get_submodule(self.family.blocks))

    def _heads(self) -> tuple[int, int]:
        c = self.model.config
        h = c.num_attention_heads if hasattr(c, "num_attention_heads") else c.n_head
        d = getattr(c, "head_dim", None) or c.hidden_size // h
        return h, d

    @property
    def n_ctx(self) -> int | None:
        """Positions the model was built for (``n_positions`` / ``max_position_embeddings``
        of its config); None when the config names none."""
        c = self.model.config
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            v = getattr(c, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def _acts(self) -> dict[str, tuple[str, str]]:
        return dict(self.family.acts) | self.variant.acts

    def _block_params(self) -> tuple[tuple[str, str], ...]:
        return self.variant.block_params or self.family.block_params

    def _check_modules(self) -> None:
        for L in range(self._n_blocks()):
            for short, (rel, io) in self._acts().items():
                path = f"{self.family.blocks}.{L}" + (f".{rel}" if rel else "")
                try:
                    mod = self.model.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"HFHandle: {type(self.model).__name__} has no module "
                                     f"{path!r} for site 'blocks.{L}.{short}' - not the "
                                     f"{self.family.name} layout this family table expects"
                                     ) from None
                self._modules[f"blocks.{L}.{short}"] = (mod, io)
        self._modules["embed"] = (self.model.get_submodule(self.family.embed), "output")

    def site_table(self) -> dict[str, SiteInfo]:
        if self._table is None:
            c = self.model.config
            d = c.hidden_size if hasattr(c, "hidden_size") else c.n_embd
            H, _ = self._heads()
            d_mlp = self._d_mlp()
            dims = {"attn.z": (H,), "mlp.pre": (d_mlp,), "mlp.post": (d_mlp,)}
            t: dict[str, SiteInfo] = {"embed": SiteInfo("embed", "activation",
                                                        f"{self.family.embed}:output", (d,),
                                                        None)}
            acts = self._acts()
            for L in range(self._n_blocks()):
                for short in _ORDER:
                    if short not in acts:
                        continue
                    rel, io = acts[short]
                    name = f"blocks.{L}.{short}"
                    path = f"{self.family.blocks}.{L}" + (f".{rel}" if rel else "")
                    t[name] = SiteInfo(name, "activation", f"{path}:{io}",
                                       dims.get(short, (d,)), L)
            for hf_name, p in self.model.named_parameters():
                site = self._param_site(hf_name)
                t[site] = SiteInfo(site, "param", hf_name, tuple(p.shape), layer_of(site))
            self._table = t
        return self._table

    def _d_mlp(self) -> int:
        c = self.model.config
        return (getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None)
                or 4 * (c.hidden_size if hasattr(c, "hidden_size") else c.n_embd))

    def _param_site(self, hf_name: str) -> str:
        m = re.fullmatch(re.escape(self.family.blocks) + r"\.(\d+)\.(.+)", hf_name)
        if m:
            for pat, suffix in self._block_params():
                if re.fullmatch(pat, m.group(2)):
                    return f"blocks.{m.group(1)}.{suffix}"
        else:
            for pat, site in self.family.root_params:
                if re.fullmatch(pat, hf_name):
                    return site
        return f"hf.{hf_name}"

    def unit_axis(self, site: str) -> tuple[str, int] | tuple[str, int, int] | None:
        """The neuron / head that owns a slice of a parameter, in *this* backend's layout.

        MLP weights: ``(blocks.L.mlp.post, axis)`` - ``blocks.L.mlp.W_out`` is ``(..., 1)`` for
        ``[out, in]`` weights, ``(..., 0)`` for GPT-2's ``[in, out]``. Attention weights are flat
        over heads, so they get a third entry, the group: head ``h`` owns elements
        ``h*d_head .. (h+1)*d_head - 1`` along ``axis`` (``attn.W_O``; ``attn.W_Q`` / ``b_Q`` when
        not fused; ``attn.W_K`` / ``W_V`` / biases only without grouped-query attention - a
        shared key/value head belongs to no single query head). Fused ``W_QKV`` (GPT-2,
        GPT-NeoX), norms and output biases belong to no unit: None.
        (``excise.sites.unit_of_param`` assumes TransformerLens layouts.)"""
        L = layer_of(site)
        if L is None or self.info(site).kind != "param":
            return None
        conv1d = self.family.conv1d  # [in, out]
        suffix = site[len(f"blocks.{L}."):]
        mlp = {"mlp.W_in": 1 if conv1d else 0, "mlp.W_gate": 0, "mlp.b_in": 0,
               "mlp.W_out": 0 if conv1d else 1}
        if suffix in mlp:
            return f"blocks.{L}.mlp.post", mlp[suffix]
        H, dh = self._heads()
        heads = {"attn.W_O": 0 if conv1d else 1, "attn.W_Q": 0, "attn.b_Q": 0}
        if getattr(self.model.config, "num_key_value_heads", None) in (None, H):
            heads.update({"attn.W_K": 0, "attn.W_V": 0, "attn.b_K": 0, "attn.b_V": 0})
        axis = heads.get(suffix)
        if axis is None or self.parameter(site).shape[axis] != H * dh:
            return None
        return f"blocks.{L}.attn.z", axis, dh

    def unit_out_weights(self, site: str) -> Tensor:
        """``[d_mlp, d_model]`` for ``blocks.L.mlp.post``, ``[n_heads, d_head, d_model]`` for
        ``blocks.L.attn.z``: what each unit writes, in TransformerLens layout (a detached view
        of the HF weight)."""
        L = layer_of(site)
        conv1d = self.family.conv1d
        if site == f"blocks.{L}.mlp.post":
            w = self.parameter(f"blocks.{L}.mlp.W_out").detach()
            return w if conv1d else w.T
        if site == f"blocks.{L}.attn.z":
            H, dh = self._heads()
            w = self.parameter(f"blocks.{L}.attn.W_O").detach()
            return (w if conv1d else w.T).reshape(H, dh, -1)
        raise self._unit_site_error(site)

    def site_writers(self, site: str) -> tuple[tuple[str, int, bool], ...]:
        """As :meth:`ModelHandle.site_writers`, in HF layouts. Refused: ``embed`` (GPT-2 and
        Gemma tie it to the unembedding, Gemma scales it) and Gemma 2/3's ``attn.out`` /
        ``mlp.out`` (normalised after the block, so not affine in its weights)."""
        if site == "embed":
            raise ValueError("HFHandle: 'embed' cannot be rewritten through its weights (tied to "
                             "the unembedding in GPT-2 and Gemma, scaled in Gemma)")
        if site.endswith((".attn.out", ".mlp.out")) and self.variant.post_norm:
            raise ValueError(f"HFHandle: {site!r} is normalised after the block "
                             f"({self.model.config.model_type}: post-attention / "
                             f"post-feedforward norm), so it is not affine in the block's weights")
        # d_model is the output axis: the last of [in, out] (Conv1D), the first of [out, in]
        return self._writers(site, 1 if self.family.conv1d else 0)

    def quant_axes(self, site: str) -> tuple[int, ...] | None:
        """From the module that owns the weight: ``nn.Linear`` weights are ``[out, in]`` and
        ``nn.Embedding`` tables ``[rows, d]`` (reduce over axis 1: one scale per output channel /
        row), GPT-2's ``Conv1D`` weights ``[in, out]`` (reduce over axis 0). Biases, norms and
        weights of other modules: None."""
        info = self.info(site)
        if info.kind != "param" or len(info.unit_shape) != 2 or \
                not info.target.endswith(".weight"):
            return None
        module = self.model.get_submodule(info.target.rsplit(".", 1)[0])
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            return (1,)
        from transformers.pytorch_utils import Conv1D

        return (0,) if isinstance(module, Conv1D) else None

    # -- data -------------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise ValueError(f"HFHandle {self.name!r} has no tokenizer: pass one to encode facts "
                             f"or text (logits / hooks work on token ids without one)")
        return self.tokenizer

    def _specials(self) -> tuple[int, int]:
        tok = self._tok()
        if tok.bos_id is None:
            raise ValueError("HFHandle.encode: the tokenizer has neither a BOS nor an EOS token "
                             "to start sequences with")
        return tok.bos_id, tok.pad_id

    def _ids(self, text: str) -> list[int]:
        return list(self._tok()(text, add_special_tokens=False)["input_ids"])

    def encode(self, facts: Sequence[Fact]) -> Batch:
        """``[BOS] + prompt tokens + target tokens``, right padded. The target is joined to the
        prompt with one space (none when either side already has whitespace there). When the
        tokenizer splits the joined text differently (a token straddling the prompt/target
        boundary) it warns or raises, per ``on_split``."""
        if not facts:
            raise ValueError("cannot encode an empty list of facts")
        tok = self._tok()
        bos, pad = self._specials()
        rows, tmask, smask = [], [], []
        for f in facts:
            sep = "" if (f.prompt[-1:].isspace() or f.target[:1].isspace()) else " "
            self.check_fits(f.prompt + sep + f.target, self._ids, f.prompt)
            p = self._ids(f.prompt)
            t = self._ids(sep + f.target)
            if not t:
                raise ValueError(f"fact {f.prompt!r} -> {f.target!r}: the target is empty "
                                 f"after tokenization")
            self.check_length(1 + len(p) + len(t), f.prompt)
            joined = self._ids(f.prompt + sep + f.target)
            if joined != p + t:
                self._split_problem(f, p, t, joined)
            ids = [bos] + p + t
            rows.append(ids)
            tmask.append([False] * (1 + len(p)) + [True] * len(t))
            smask.append([False] + self._subject_mask(f, p))
        del tok
        return pad_batch(rows, tmask, smask, pad)

    def _split_problem(self, f: Fact, p: list[int], t: list[int], joined: list[int]) -> None:
        tok = self._tok()
        show = lambda ids: [tok.decode([i]) for i in ids]  # noqa: E731
        msg = (f"fact {f.prompt!r} -> {f.target!r}: the tokenizer splits prompt+target as "
               f"{show(joined)}, but the prompt alone as {show(p)} and the target as {show(t)}. "
               f"excise feeds the prompt's own tokens followed by the target's, so recall means "
               f"'greedy decoding from the prompt yields these target tokens'; end the prompt "
               f"on a whole word (no trailing space) so the boundary is unambiguous")
        if self.on_split == "raise":
            raise ValueError(msg)
        if self.on_split == "warn" and (f.prompt, f.target) not in self._warned:
            self._warned.add((f.prompt, f.target))
            warnings.warn(msg, stacklevel=3)

    def _subject_mask(self, f: Fact, p: list[int]) -> list[bool]:
        mask = [False] * len(p)
        if not f.subject:
            return mask
        start = f.prompt.find(f.subject)
        if start < 0:
            return mask
        end = start + len(f.subject)
        tok = self._tok()
        if getattr(tok, "is_fast", False):
            enc = tok(f.prompt, add_special_tokens=False, return_offsets_mapping=True)
            for j, (a, b) in enumerate(enc["offset_mapping"][:len(p)]):
                mask[j] = a < end and b > start
            return mask
        sub = self._ids(f.subject)
        for j in range(len(p) - len(sub) + 1):
            if p[j:j + len(sub)] == sub:
                mask[j:j + len(sub)] = [True] * len(sub)
                break
        return mask

    def encode_texts(self, texts: Sequence[str]) -> Batch:
        """Plain text for language-model loss: every token after the first is a target."""
        if not texts:
            raise ValueError("cannot encode an empty list of texts")
        bos, pad = self._specials()
        rows = []
        for t in texts:
            self.check_fits(t, self._ids, t, "text")
            rows.append([bos] + self._ids(t))
            self.check_length(len(rows[-1]), t, "text")
        T = max(map(len, rows))
        tokens = torch.full((len(rows), T), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows])
        mask = torch.arange(T)[None, :] < lengths[:, None]
        mask[:, :2] = False
        return Batch(tokens, mask, torch.zeros_like(mask), lengths)

    # -- running ----------------------------------------------------------------------------
    def _forward(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits

    def target_logprobs(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None
                        ) -> Tensor:
        """As ``ModelHandle.target_logprobs``, but only the positions that predict a target
        token go through the unembedding (HF ``logits_to_keep`` with a boolean mask): a fact
        prompt has one to three targets, and the vocabulary projection (262k rows for Gemma)
        dominates the cost of a small model's forward and backward."""
        keep = torch.zeros_like(batch.target_mask)
        keep[:, :-1] = batch.target_mask[:, 1:]
        with self.hooks(hooks or {}):
            logits = self.model(input_ids=batch.tokens.to(self.device), use_cache=False,
                                logits_to_keep=keep.to(self.device)).logits
        return torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)

    @property
    def affine_readout(self) -> bool:
        """Logits are ``lm_head(final hidden)``, affine (no final-logit soft-capping), and the
        weights are here (not a remote model)."""
        return not self.remote and getattr(self.model.config, "final_logit_softcapping",
                                           None) is None

    def target_hidden(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        """The base model's last hidden state (after its final norm: what ``lm_head`` reads in
        the model's own forward) at the positions that predict a target token, ``[k,
        d_model]``; see ``ModelHandle.target_hidden``."""
        keep = torch.zeros_like(batch.target_mask)
        keep[:, :-1] = batch.target_mask[:, 1:]
        with self.hooks(hooks or {}):
            h = self.model.base_model(input_ids=batch.tokens.to(self.device),
                                      use_cache=False).last_hidden_state
        return h[keep.to(h.device)]

    def unembed(self, hidden: Tensor) -> Tensor:
        """``lm_head`` and the final-logit soft-capping when the config has one (Gemma 2), as
        the ``ForCausalLM`` forward applies them; float32 (or wider)."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def linear_module(self, site: str) -> torch.nn.Linear | None:
        """The HF module whose ``weight`` parameter ``site`` is, when it is a plain
        ``nn.Linear`` (Llama / Gemma / NeoX projections; not GPT-2's ``Conv1D``, embeddings or
        norms)."""
        target = self.info(site).target
        path, _, leaf = target.rpartition(".")
        mod = self.model.get_submodule(path) if path else None
        return mod if leaf == "weight" and type(mod) is torch.nn.Linear else None

    def _unembedding_matrix(self) -> Tensor:
        return self.model.get_output_embeddings().weight.detach()

    def _unembedding_bias(self) -> Tensor | None:
        b = getattr(self.model.get_output_embeddings(), "bias", None)
        return None if b is None else b.detach()

    def token_logprobs(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        """As ``ModelHandle.token_logprobs``, computed from ``target_logprobs`` (target
        positions only)."""
        tgt = batch.target_mask[:, 1:]
        lp = self.target_logprobs(batch, hooks)
        tokens = batch.tokens.to(lp.device)
        picked = lp.gather(-1, tokens[:, 1:][tgt.to(lp.device)][:, None]).squeeze(-1)
        out = torch.zeros(tgt.shape, dtype=picked.dtype, device=picked.device)
        return out.masked_scatter(tgt.to(picked.device), picked)

    def _attach(self, site: str, fn: HookFn) -> RemovableHandle:
        """A torch forward hook (``output`` sites) or forward pre-hook (``input`` sites) on the
        HF module; ``attn.z`` is reshaped to ``[..., n_heads, d_head]`` for ``fn`` and back."""
        module, io = self._modules[site]
        heads = self._heads() if site.endswith(".attn.z") else None

        def check(new, old):
            if new.shape != old.shape:
                raise ValueError(f"hook at {site!r} returned shape {tuple(new.shape)}, "
                                 f"expected {tuple(old.shape)}")
            return new

        if io == "output":
            def hook(mod, args, output):
                act = output[0] if isinstance(output, tuple) else output
                new = fn(act, site)
                new = act if new is None else check(new, act)
                return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
            return module.register_forward_hook(hook)

        def pre_hook(mod, args, kwargs):
            if args:
                x = args[0]
            elif "hidden_states" in kwargs:
                x = kwargs["hidden_states"]
            else:
                raise ValueError(f"hook at {site!r}: {type(mod).__name__} was called without "
                                 f"a positional input or hidden_states")
            act = x.reshape(*x.shape[:-1], *heads) if heads else x
            new = fn(act, site)
            new = act if new is None else check(new, act)
            new = new.reshape(x.shape) if heads else new
            if args:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def _cache_kwarg(self) -> str:
        """The forward's name for a key/value cache (``cache`` in recent transformers)."""
        if self._cache_kw is None:
            import inspect

            params = inspect.signature(self.model.forward).parameters
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return self._cache_kw

    def kv_run(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None
               ) -> tuple[Tensor, Past]:
        """The HF forward with a ``DynamicCache`` it fills (one entry per block; created
        without the config, so sliding-window blocks keep every position too)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        with self.hooks(hooks or {}):
            out = self.model(input_ids=tokens.to(self.device), use_cache=True,
                             **{self._cache_kwarg(): cache})
        return out.logits, Past(tuple(lay.keys for lay in cache.layers),
                                tuple(lay.values for lay in cache.layers), pos_dim=2)

    def _resume(self, past: Past, resid: Tensor, layer: int, hooks: Mapping[str, HookFn],
                stop: int | None, last_mlp: bool) -> Tensor:
        """The HF forward itself (its masks, positions, rotary and sliding-window layers) on a
        ``DynamicCache`` built from ``past`` with the model's config; blocks outside ``layer ..
        stop - 1`` pass their input through unchanged for this call (a per-instance
        ``forward``, the previous one restored in ``finally``), a pre-hook puts ``resid`` into
        block ``layer``, with ``last_mlp`` one on the last block's ``mlp`` keeps the last
        position
        and, with ``stop``, a hook keeps what block ``stop - 1`` returns."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=list(zip(past.keys, past.values)),
                             config=self.model.config)
        blocks = list(self.model.get_submodule(self.family.blocks))
        skipped = blocks[:layer] + (blocks[stop:] if stop is not None else [])
        kept: list[Tensor] = []

        def passthrough(hidden_states=None, *args, **kwargs):
            return kwargs["hidden_states"] if hidden_states is None else hidden_states

        def enter(module, args, kwargs):
            if args:
                return (resid,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": resid}

        def leave(module, args, output):
            kept.append(output[0] if isinstance(output, tuple) else output)

        handles = [blocks[layer].register_forward_pre_hook(enter, with_kwargs=True,
                                                           prepend=True)]
        if last_mlp:
            handles.append(blocks[-1].mlp.register_forward_pre_hook(cut_to_last_position,
                                                                     with_kwargs=True))
        # a forward already set on the instance (nnsight's, once run_with_cache has run) is put
        # back afterwards
        own = [(b, b.__dict__["forward"]) for b in skipped if "forward" in b.__dict__]
        try:
            for b in skipped:
                b.forward = passthrough
            with self.hooks(hooks):
                if stop is not None:  # registered after the caller's hooks: sees their result
                    handles.append(blocks[stop - 1].register_forward_hook(leave))
                out = self.model(inputs_embeds=torch.zeros_like(resid), use_cache=True,
                                 logits_to_keep=1, **{self._cache_kwarg(): cache})
        finally:
            for h in handles:
                h.remove()
            for b in skipped:
                b.__dict__.pop("forward", None)
            for b, f in own:
                b.__dict__["forward"] = f
        return kept[0] if stop is not None else out.logits[:, -1]

    def functional_loss(self):
        """Not offered: the Hugging Face forward is not run under ``torch.func`` here."""
        raise ValueError(f"estimator='example' on parameter sites needs the TransformerLens "
                         f"backend; {type(self).__name__} supports estimator='batch' (or "
                         f"per-example Fisher of activation sites)")

    def readout(self):
        """The final norm module (found from ``ln_final.w``'s HF name) and ``lm_head`` as
        ``W_U [d_model, vocab]`` (transposed), ``b_U`` (zeros when it has no bias). Gemma's
        final-logit soft-capping, when configured, is left out (it keeps the argmax)."""
        norm = self.model.get_submodule(self.info("ln_final.w").target.rsplit(".", 1)[0])
        head = self.model.get_output_embeddings()
        b = head.bias if getattr(head, "bias", None) is not None else \
            torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
        return norm, head.weight.detach().T, b.detach()

    def clone(self) -> "HFHandle":
        return HFHandle(copy.deepcopy(self.model), self.tokenizer, self.name, self.on_split)

    def _envoy(self, path: str):
        node = self._nnsight()
        for part in path.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    def _nnsight(self):
        if self._nn is None:
            from nnsight import NNsight

            self._nn = NNsight(self.model)
        return self._nn

    def run_with_cache(self, tokens: Tensor, sites: Sequence[str],
                       stop_at_layer: int | None = None) -> dict[str, Tensor]:
        """Activations at ``sites``, read with an nnsight trace that stops after the last one
        (blocks past it never run). ``attn.z`` comes back as ``[batch, pos, heads, d_head]``."""
        if stop_at_layer is not None:
            raise ValueError("HFHandle.run_with_cache: stop_at_layer is not supported on the "
                             "Hugging Face backend; the trace already stops after the last "
                             "requested site")
        if isinstance(sites, str):
            sites = self.sites(sites)
        infos = [self.info(s) for s in sites]
        bad = [i.name for i in infos if i.kind != "activation"]
        if bad:
            raise ValueError(f"run_with_cache reads activation sites; {bad[0]!r} is a "
                             f"{self.info(bad[0]).kind} site")
        order = sorted(infos, key=lambda i: (-1, 0) if i.layer is None else
                       (i.layer, _ORDER.index(i.name.split(".", 2)[2])))
        plan = [(i.name, self._envoy(i.target.split(":")[0]), i.target.split(":")[1])
                for i in order]
        model = self._nnsight()
        saved = {}
        with model.trace(tokens.to(self.device), use_cache=False) as tracer:
            for name, env, io in plan:
                saved[name] = (env.output if io == "output" else env.input).save()
            tracer.stop()
        out = {}
        H, dh = self._heads()
        for name in sites:
            v = saved[name]
            v = v[0] if isinstance(v, tuple) else v
            if name.endswith(".attn.z"):
                v = v.reshape(*v.shape[:-1], H, dh)
            out[name] = v
        return out


# ---------------------------------------------------------------------------------------------
def _gemma(**kw):
    from excise.gemma import gemma3_270m

    return gemma3_270m(**kw)


# model name -> loader returning an HFHandle (config: ``model: {name: gemma3-270m}``)
MODELS = {"gemma3-270m": _gemma}


def load_model(name: str | None = None, path: str | None = None, *, on_split: str = "warn",
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               device_map: str | dict | None = None, log=print) -> HFHandle:
    """An :class:`HFHandle` for a named model (``MODELS``) or a local Hugging Face folder
    (``from_pretrained(path)``, no download: ``local_files_only``).

    ``device``: ``"auto"`` (a GPU when present), ``"cpu"``, ``"cuda:1"``, ...; None: the CPU.
    ``dtype``: ``"bfloat16"``, ``"float16"``, ``"float32"`` (None / ``"auto"``: float32).
    ``device_map``: shard the model with accelerate (``"auto"`` or ``{module: device}``); then
    ``device`` must be None - each layer runs where the map puts it, and the input tokens go to
    the token embedding's device."""
    if (name is None) == (path is None):
        raise ValueError("load_model: give exactly one of name= (one of "
                         f"{sorted(MODELS)}) or path= (a local Hugging Face model folder)")
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    device_map = check_device_map(device_map)
    if device_map is not None and dev is not None:
        raise ValueError(f"load_model: device={device!r} and device_map={device_map!r} both "
                         f"place the model; give one of them")
    if name is not None:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)} or give "
                             f"path= to a local Hugging Face folder")
        return MODELS[name](on_split=on_split, log=log, device=dev, dtype=dt,
                            device_map=device_map)
    return from_folder(path, on_split=on_split, device=dev, dtype=dt, device_map=device_map)


def from_folder(path, tokenizer_path=None, *, name: str | None = None, on_split: str = "warn",
                device: torch.device | None = None, dtype: torch.dtype | None = None,
                device_map: str | dict | None = None) -> HFHandle:
    """A local Hugging Face folder as an :class:`HFHandle`, placed as asked (see
    :func:`load_model`; ``device`` / ``dtype`` already resolved). Weights load in float32 unless
    ``dtype`` says otherwise, then are checked finite."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"device_map": device_map} if device_map is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32,
                                                 local_files_only=True, **kw)
    if device is not None:
        model.to(device)
    if device_map is not None:
        dispatch(model, device_map)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or path), local_files_only=True)
    handle = HFHandle(model, tokenizer, name=name or str(path), on_split=on_split)
    handle.check_finite(f"loading {path}")
    return handle


def dispatch(model, device_map) -> None:
    """Make sure a model loaded with a ``device_map`` runs through accelerate's device hooks -
    also when every entry names one device (transformers then skips dispatching; the hooks are
    what moves activations between shards, so they run here the way they run on several GPUs) -
    and that no weight was offloaded: a module accelerate keeps on ``meta`` between forwards
    cannot be read, scored or edited in place."""
    from accelerate import dispatch_model

    if isinstance(device_map, dict) and getattr(model, "hf_device_map", None) is None:
        # accelerate warns of "meta" parameters whenever a map names the CPU, offloaded or not
        # (with the CPU as the main device nothing is): the check below is the real one
        quiet = logging.getLogger("accelerate.big_modeling")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            dispatch_model(model, device_map=device_map, force_hooks=True)
        finally:
            quiet.setLevel(level)
        model.hf_device_map = dict(device_map)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    entries = getattr(model, "hf_device_map", None) or {}
    offloaded = sorted({next((k for k in entries if n == k or n.startswith(k + ".")), n)
                        for n in meta})
    if offloaded:
        raise ValueError(f"device_map offloads {', '.join(map(repr, offloaded))} to the CPU "
                         f"or disk, where accelerate keeps their "
                         f"weights off the model between forwards; excise reads and edits "
                         f"weights in place. Map every module to a device (a GPU index, "
                         f"'cuda:N', or 'cpu' when no GPU is in the map), or use device= instead")
