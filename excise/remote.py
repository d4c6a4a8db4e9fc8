"""Hugging Face models run remotely on NDIF (nnsight's ``remote=True``): forward passes only.

:func:`load_remote` gives a :class:`RemoteHFHandle` for a model NDIF hosts. The handle holds the
model's architecture on the meta device (built from its config; no weights are downloaded) and
its tokenizer, so sites, layouts and encoding work as for :class:`excise.hf.HFHandle`. Every
forward pass becomes one nnsight trace sent to NDIF, and what the stage asked for comes back:

- ``logits`` / ``target_logprobs`` / ``token_logprobs`` / ``loss``: one trace per call.
  ``logits`` sends back every position's logits (``[n, T, vocab]``: 2.7 GB in bfloat16 for 256
  prompts of 20 tokens on Gemma 3's 262k vocabulary - keep batches small); the others only
  the target positions' (as ``HFHandle`` unembeds only those);
- ``run_with_cache``: one trace that stops after the last requested site;
- hooks passed to those calls run inside the trace, on the server: a hook that returns a new
  tensor changes the run there; a hook that returns None (it reads) runs there and again here,
  on the activation the trace sends back, so what it stores lands in the caller's objects.
  Hooks travel by value (their source and the values they close over): closures and lambdas
  do; a hook defined at module level in a package the server lacks does not;
- ``kv_run`` / ``resume`` (exact causal tracing): ``kv_run`` keeps the residual entering every
  block; ``resume`` recomputes the run from the residual entering block ``layer`` (positions
  before ``t``) and ``resid`` (positions from ``t``) - equal to continuing from the keys and
  values up to float rounding, one trace per call. Exact tracing resumes once per (position,
  block): 112 traces for a 7-token prompt on 12 layers, where its full-forward path (the one
  it takes for a model with hooks attached) needs 2 - each trace is a round trip to NDIF;
- ``fetch(site)`` / ``unit_out_weights``: a read-only copy of one weight, one trace, cached.

The weights never leave the server, so anything that changes them, attaches hooks to the
modules, copies the model or takes gradients through it raises :class:`RemoteError`, which names
what was asked and says to load the model locally. Locate and edit methods are checked by name
when they start (they all call ``check_finite(method)`` first): only the forward-only ones in
:data:`REMOTE_STAGES` run.

The request a trace sends is nnsight's own (``RequestModel``: the model key
``nnsight.modeling.transformers.TransformersModel:{"repo_id": ..., "revision": ..., "task":
"text-generation"}`` plus the serialized trace); :class:`NDIFBackend` sends it (NDIF's host and
API key come from nnsight's ``CONFIG``: ``NDIF_HOST``, ``NDIF_API_KEY``) and reads the result
with ``torch.load(weights_only=True)``: only tensors, lists, dicts and strings come back.
:class:`OfflineBackend` builds the same request without sending it, and with a
:class:`LocalServer` runs it on a local copy of the model the way the server would (the payload
deserialized against that model, refusing any module a server does not have).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from nnsight import save as nn_save
from nnsight.intervention.backends.remote import RemoteBackend
from nnsight.intervention.serialization import CustomCloudUnpickler
from nnsight.schema.request import RequestModel
from torch import Tensor

from excise.handle import Batch, HookFn, Past
from excise.hf import _ORDER, HFHandle
from excise.sites import layer_of


class RemoteError(ValueError):
    """A remote model was asked for what only local weights give (or a request was not sent)."""


# the stages a remote model runs (the names locate / edit / verify pass to check_finite when they
# start): every model call they make is a forward pass the handle sends as a trace
REMOTE_STAGES = ("activations", "causal tracing", "verify")
_RUNS = ("locate.activations, locate.traces(..., mode='exact') (causal tracing) and "
         "probes.verify's behaviour, privacy, loo_probe and drift suites")
# why the gradient-based locate methods and the edit methods do not (any other stage - a method
# not checked to run remotely, such as locate.sae - is refused too)
NEEDS_WEIGHTS = {
    "fisher": "it takes gradients of the loss through the weights",
    "grad_ratio": "it takes gradients of the loss through the weights",
    "circuit": "it takes gradients through the model (attribution)",
    "attribution": "attribution patching takes gradients through the model",
    "causal_trace": "its unit scores come from attribution patching, which takes gradients "
                    "through the model (the exact trace alone runs remotely: "
                    "locate.traces(model, facts, mode='exact'))",
    "fact_lookup": "its default mode, attribution, takes gradients through the model",
    "subnetwork": "it trains a mask on the units by gradients through the model",
    "saliency": "it takes gradients of the loss through the weights",
}
EDIT_METHODS = ("dampen", "prune", "noise", "project", "finetune", "reinit", "distill")
_EDITS = "it changes the weights, or attaches hooks to the modules, of a model whose weights " \
         "stay on the NDIF server"
_LOCAL = "load the model locally instead (excise.hf.load_model(path=...); in a config " \
         "model.remote: false)"


# -- the trace bodies: their source and the values they name are what a request carries ------
# (module-level functions, so a trace names no handle; only torch and nnsight are looked up on
# the server)
def _run_trace(lm, backend, tokens: Tensor, forward: dict, steps: list, t0: int,
               output: str) -> None:
    """One forward on the server: each step ``(site, envoy, io, heads, fn, base, keep)`` in
    model order takes the site's activation (``base`` replaces it) at positions ``t0 ..``,
    runs ``fn`` on it (a tensor back is written into the run) and sends back, under ``read``,
    what a hook read (it returned None) or a plain read asked for (no ``fn``, ``base`` or
    ``keep``), under ``kept`` the final value when ``keep``; then the logits, or the run stops
    there (``output="stop"``). Each value travels once."""
    with lm.trace(input_ids=tokens, backend=backend, **forward) as tracer:
        out = {"read": {}, "kept": {}, "wrote": []}
        nn_save(out)
        for site, env, io_, heads, fn, base, keep in steps:
            value = env.output if io_ == "output" else env.input
            act = value[0] if isinstance(value, tuple) else value
            if base is not None:
                act = base.to(act.device, act.dtype)
            view = act.reshape(*act.shape[:-1], *heads) if heads else act
            part = view[:, t0:]
            new = None if fn is None else fn(part, site)
            if new is None:
                part = part.detach().clone()
                if fn is not None or (base is None and not keep):
                    out["read"][site] = part
            else:
                if tuple(new.shape) != tuple(part.shape):
                    raise ValueError(f"hook at {site!r} returned shape {tuple(new.shape)}, "
                                     f"expected {tuple(part.shape)}")
                out["wrote"].append(site)
                part = new
                view = torch.cat([view[:, :t0], new.to(view.dtype)], 1) if t0 else new
            if new is not None or base is not None:
                act = view.reshape(act.shape)
                value = (act,) + tuple(value[1:]) if isinstance(value, tuple) else act
                if io_ == "output":
                    env.output = value
                else:
                    env.input = value
            if keep:
                out["kept"][site] = part if new is None else part.detach().clone()
        if output == "stop":
            tracer.stop()
        out["logits"] = lm.output.logits.detach().clone()


def _fetch_trace(lm, backend, tokens: Tensor, wanted: list) -> None:
    """Copies of weights ``(name, envoy, attribute)`` from the server; the forward stops at
    once."""
    with lm.trace(input_ids=tokens, backend=backend) as tracer:
        out = {"read": {}}
        nn_save(out)
        for name, env, attr in wanted:
            out["read"][name] = getattr(env, attr).detach().clone()
        tracer.stop()


# -- backends: how a trace's request travels ---------------------------------------------------
class NDIFBackend(RemoteBackend):
    """nnsight's ``RemoteBackend`` (blocking: one websocket, status lines), reading the result
    with ``weights_only=True`` (tensors, lists, dicts, strings: nothing else is unpickled) and
    keeping it as ``result``."""

    result: dict | None = None

    def __call__(self, tracer=None):
        self.result = None
        self.result = super().__call__(tracer)
        return self.result

    def finalize(self, content: bytes) -> dict:
        if self.compress:
            import zstandard

            content = zstandard.ZstdDecompressor().decompress(content)
        return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)


class OfflineBackend(NDIFBackend):
    """The request NDIF would get, built and recorded in ``sent`` (``(RequestModel, payload
    bytes)``) but never sent: no connection is opened. With ``server`` (a :class:`LocalServer`)
    it runs there and its result comes back as NDIF's would (:meth:`NDIFBackend.finalize`);
    without, :class:`RemoteError`."""

    def __init__(self, model_key: str, server: "LocalServer | None" = None,
                 sent: list | None = None, host: str | None = None, env: dict | None = None):
        super().__init__(model_key, host=host, env=env or {}, blocking=True)
        self.server = server
        self.sent = sent if sent is not None else []

    def request(self, request, tracer):
        blob = self._serialize(tracer)
        self.sent.append((request, blob))
        if self.server is None:
            raise RemoteError(f"offline: the request for {self.model_key} was built "
                              f"({len(blob):,} bytes) but not sent (no server)")
        return self.download_result(self.server(request, blob))

    def _post(self, request, blob):  # the other way out (non-blocking submits): never taken
        raise RemoteError("offline: nothing is sent")


# modules a payload may name on the server: what NDIF has installed, and the standard library
_SERVER_ROOTS = {"torch", "transformers", "nnsight", "cloudpickle", "numpy", "accelerate",
                 "einops", "peft"}


class ServerUnpickler(CustomCloudUnpickler):
    """Refuses, as a server without them would, any module outside NDIF's environment."""

    def find_class(self, module: str, name: str):
        root = module.split(".")[0]
        if root not in _SERVER_ROOTS and root not in sys.stdlib_module_names:
            raise pickle.UnpicklingError(f"the request names {module}.{name}, which a server "
                                         f"does not have")
        return super().find_class(module, name)


class LocalServer:
    """Runs requests the way NDIF runs them, on the model in a local Hugging Face folder: the
    model key must name ``repo_id``, the payload is deserialized against this model's modules
    (refusing any module a server lacks), run, and its saved values are returned as result
    bytes (``torch.save``, compressed when the request asks). For offline tests and dry runs;
    ``requests`` counts what it ran."""

    def __init__(self, path: str | Path, repo_id: str):
        from nnsight import TransformersModel
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.lm = TransformersModel(str(path), task="text-generation", tokenizer=tok,
                                    dispatch=True, dtype=torch.float32)
        self.lm._module.eval()
        self.repo_id = repo_id
        self.requests = 0

    def __call__(self, request: RequestModel, blob: bytes) -> bytes:
        key = json.loads(request.model_key.split(":", 1)[1])
        if key.get("repo_id") != self.repo_id:
            raise RemoteError(f"LocalServer serves {self.repo_id!r}, not {key.get('repo_id')!r}")
        tracer = RequestModel.deserialize(blob, self.lm._remoteable_persistent_objects(),
                                          compress=request.compress,
                                          unpickler=ServerUnpickler)
        self.lm._remoteable_set_env(request.env)
        before = dict(tracer.info.frame.f_locals)
        tracer.execute(tracer.info.code)
        after = tracer.info.frame.f_locals
        result = {k: v for k, v in after.items() if k not in before or v is not before[k]}
        self.requests += 1
        buf = io.BytesIO()
        torch.save(result, buf)
        data = buf.getvalue()
        if request.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=6).compress(data)
        return data


# -- keys and values of a remote run -------------------------------------------------------------
@dataclass(frozen=True)
class RemotePast(Past):
    """What :meth:`RemoteHFHandle.resume` continues from: the run's tokens and the residual
    entering every block (``entries``, ``[runs, T, d_model]`` each), of which positions ``< t``
    count. ``written``: the highest block where a ``kv_run`` hook changed the run (-1: none
    did, or only the embedding); ``resume`` at or below it is refused (positions before ``t``
    of the blocks above are recomputed without the hook)."""

    tokens: Tensor  # [runs, T] long
    entries: tuple[Tensor, ...]
    t: int
    written: int = -1

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.t

    def __getitem__(self, rows) -> "RemotePast":
        return replace(self, tokens=self.tokens[rows], entries=tuple(e[rows] for e in self.entries))

    def upto(self, t: int) -> "RemotePast":
        if not 0 <= t <= self.t:
            raise ValueError(f"RemotePast.upto: t={t} outside 0..{self.t}")
        return replace(self, t=t)


# -- the handle ------------------------------------------------------------------------------------
class RemoteHFHandle(HFHandle):
    """A Hugging Face causal LM that NDIF runs (see the module docstring): the architecture on
    the meta device here, the weights on the server. ``traces`` counts the traces sent.

    ``backend``: ``fn(model_key, env=...) -> backend`` for each trace (default:
    :class:`NDIFBackend` on ``host``, nnsight's configured NDIF host when None); offline,
    ``functools.partial(OfflineBackend, server=LocalServer(folder, repo_id))``.
    """

    remote = True

    def __init__(self, lm, tokenizer, repo_id: str, *, revision: str | None = None,
                 host: str | None = None, backend: Callable | None = None,
                 on_split: str = "warn"):
        super().__init__(lm._module, tokenizer, name=repo_id, on_split=on_split)
        self.lm = lm
        self.repo_id = repo_id
        self.revision = revision
        self.host = host
        self._make_backend = backend
        self._key: str | None = None
        self._fetched: dict[str, Tensor] = {}
        self.traces = 0

    def __repr__(self) -> str:
        return f"RemoteHFHandle({self.repo_id!r}, revision={self.revision!r})"

    # -- identity and placement ---------------------------------------------------------------
    def model_key(self) -> str:
        """nnsight's key for the model (the repo id canonicalised by the Hub, asked once)."""
        if self._key is None:
            self._key = self.lm.to_model_key()
        return self._key

    def backend(self):
        """A backend for one trace: ``backend(model_key, env=...)`` as given to the handle,
        else :class:`NDIFBackend` on ``host``. ``env``: what the server sets on the model
        before the run (nnsight's: the attention implementation)."""
        key, env = self.model_key(), self.lm._remoteable_get_env()
        if self._make_backend is not None:
            return self._make_backend(key, env=env)
        return NDIFBackend(key, host=self.host, env=env)

    def fingerprint(self) -> str:
        """Hash of the repo id and revision: the weights NDIF serves under that name (no
        revision: whatever the repo's main branch holds)."""
        h = hashlib.sha256(f"remote\0{self.repo_id}\0{self.revision or ''}".encode())
        return h.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        """Inputs are built, and results come back, on the CPU."""
        return torch.device("cpu")

    @property
    def devices(self) -> list[torch.device]:
        return [torch.device("cpu")]

    @property
    def d_vocab(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def n_parameters(self) -> int:
        return sum(int(torch.Size(i.unit_shape).numel()) for i in self.site_table().values()
                   if i.kind == "param")

    # -- what needs local weights -------------------------------------------------------------
    def _refuse(self, what: str, why: str = "", verdict: str = "needs local weights"
                ) -> RemoteError:
        return RemoteError(f"{what}: {verdict}{' - ' + why if why else ''}. The model "
                           f"{self.name!r} runs remotely (NDIF, remote=True), where only forward "
                           f"passes run: {_RUNS}. To run {what}, {_LOCAL}")

    def check_finite(self, stage: str = "") -> None:
        """The weights are the server's (it checks them); ``stage`` (the locate / edit method
        or ``verify``, naming itself when it starts) must be one that runs remotely
        (:data:`REMOTE_STAGES`)."""
        if not stage or stage in REMOTE_STAGES or stage.startswith("loading "):
            return
        if stage in NEEDS_WEIGHTS or stage in EDIT_METHODS:
            raise self._refuse(stage, NEEDS_WEIGHTS.get(stage, _EDITS))
        raise self._refuse(stage, "only the methods checked to run remotely are",
                           verdict="is not offered on a remote model")

    def parameter(self, site: str):
        extra = " (causal tracing: pass noise=, e.g. 3 * float(model.fetch('embed.W_E').std()))" \
            if site == "embed.W_E" else ""
        raise self._refuse(f"parameter({site!r})", "the weights stay on the server; "
                           "model.fetch(site) sends back a read-only copy" + extra)

    def named_parameters(self):
        raise self._refuse("named_parameters()", "the weights stay on the server")

    def clone(self):
        raise self._refuse("clone()", "a copy needs the weights (verify's attacks and verdict "
                           "suites fine-tune copies of the model)")

    def hooks(self, hooks):
        raise self._refuse("hooks()", "hooks on the modules would run here, on a model without "
                           "weights; pass hooks to logits / target_logprobs, which run them in "
                           "the remote trace")

    def add_persistent_hook(self, site: str, fn: HookFn):
        raise self._refuse(f"add_persistent_hook({site!r})", "an activation edit stays on the "
                           "model's modules, which run on the server")

    def _attach(self, site, fn):
        raise self._refuse(f"a hook at {site!r}", "hooks run inside remote traces only")

    def functional_loss(self):
        raise self._refuse("functional_loss()", "per-example gradients through the weights")

    def readout(self):
        raise self._refuse("readout()", "the final norm and unembedding are the server's")

    def to(self, device=None, dtype=None):
        if device is None and dtype is None:
            return self
        raise self._refuse(f"to(device={device!r}, dtype={dtype!r})",
                           "NDIF places the weights")

    # -- reading weights -------------------------------------------------------------------
    def fetch(self, site: str) -> Tensor:
        """A read-only copy of parameter ``site`` from the server (one trace; cached)."""
        info = self.info(site)
        if info.kind != "param":
            raise ValueError(f"fetch: site {site!r} is an {info.kind} site, not a parameter "
                             f"(parameter sites look like 'blocks.0.mlp.W_out')")
        if site not in self._fetched:
            module, attr = info.target.rsplit(".", 1)
            bos = self._specials()[0] if self.tokenizer is not None else 0
            res = self._send(_fetch_trace, torch.tensor([[bos]]),
                             [(site, self._envoy(module), attr)])
            self._fetched[site] = res["read"][site]
        return self._fetched[site]

    def unit_out_weights(self, site: str) -> Tensor:
        """As :meth:`HFHandle.unit_out_weights`, from a fetched copy of ``W_out`` / ``W_O``
        (one trace per site, cached)."""
        L = layer_of(site)
        conv1d = self.family.conv1d
        if site == f"blocks.{L}.mlp.post":
            w = self.fetch(f"blocks.{L}.mlp.W_out")
            return w if conv1d else w.T
        if site == f"blocks.{L}.attn.z":
            H, dh = self._heads()
            w = self.fetch(f"blocks.{L}.attn.W_O")
            return (w if conv1d else w.T).reshape(H, dh, -1)
        raise self._unit_site_error(site)

    # -- running ----------------------------------------------------------------------------
    def _nnsight(self):
        return self.lm

    def _send(self, body: Callable, tokens: Tensor, *args) -> dict:
        backend = self.backend()
        body(self.lm, backend, tokens.detach().cpu(), *args)
        self.traces += 1
        result = getattr(backend, "result", None)
        if not isinstance(result, dict) or "out" not in result:
            raise RemoteError(f"the remote run on {self.name!r} sent back no result")
        return result["out"]

    def _order(self, sites) -> list[str]:
        def key(s):
            i = self.info(s)
            return (-1, 0) if i.layer is None else (i.layer, _ORDER.index(s.split(".", 2)[2]))
        return sorted(dict.fromkeys(sites), key=key)

    def _trace(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None, *,
               reads: Sequence[str] = (), keep: Sequence[str] = (),
               base: Mapping[str, Tensor] | None = None, t0: int = 0, output: str = "logits",
               **forward) -> dict:
        """One remote forward of ``tokens`` with ``hooks`` run on the server; read hooks
        replayed here on what they read (in model order). Returns the trace's ``out``."""
        hooks = dict(hooks or {})
        base = dict(base or {})
        if hooks and torch.is_grad_enabled():
            raise self._refuse("a forward with hooks under torch.enable_grad()",
                               "gradients through the model do not come back from a remote "
                               "run (attribution patching: locate.attribution, "
                               "locate.causal_trace's unit scores, traces(mode='fast'))")
        for s in hooks:
            kind = self.info(s).kind
            if kind != "activation":
                raise ValueError(f"site {s!r} is a {kind} site; hooks need an activation "
                                 f"site such as 'blocks.0.mlp.post'")
        steps = []
        for s in self._order(list(hooks) + list(reads) + list(keep) + list(base)):
            path, io_ = self.info(s).target.split(":")
            heads = self._heads() if s.endswith(".attn.z") else None
            steps.append((s, self._envoy(path), io_, heads, hooks.get(s), base.get(s),
                          s in keep))
        out = self._send(_run_trace, tokens, {"use_cache": False, **forward}, steps, t0, output)
        for s in self._order(hooks):
            if s in out["read"]:
                hooks[s](out["read"][s], s)
        return out

    def _forward(self, tokens: Tensor) -> Tensor:
        return self._trace(tokens, None)["logits"]

    def logits(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None) -> Tensor:
        return self._trace(tokens, hooks)["logits"]

    def target_logprobs(self, batch: Batch, hooks: Mapping[str, HookFn] | None = None
                        ) -> Tensor:
        """As :meth:`HFHandle.target_logprobs`: only target positions are unembedded (and sent
        back)."""
        keep = torch.zeros_like(batch.target_mask)
        keep[:, :-1] = batch.target_mask[:, 1:]
        logits = self._trace(batch.tokens, hooks, logits_to_keep=keep)["logits"]
        return torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)

    def run_with_cache(self, tokens: Tensor, sites: Sequence[str],
                       stop_at_layer: int | None = None) -> dict[str, Tensor]:
        """Activations at ``sites`` from one trace that stops after the last of them."""
        if stop_at_layer is not None:
            raise ValueError("RemoteHFHandle.run_with_cache: stop_at_layer is not supported; "
                             "the trace already stops after the last requested site")
        if isinstance(sites, str):
            sites = self.sites(sites)
        bad = [s for s in sites if self.info(s).kind != "activation"]
        if bad:
            raise ValueError(f"run_with_cache reads activation sites; {bad[0]!r} is a "
                             f"{self.info(bad[0]).kind} site")
        read = self._trace(tokens, None, reads=sites, output="stop")["read"]
        return {s: read[s] for s in sites}

    def kv_run(self, tokens: Tensor, hooks: Mapping[str, HookFn] | None = None
               ) -> tuple[Tensor, RemotePast]:
        """Logits and a :class:`RemotePast`: the residual entering every block (one trace)."""
        entries = [f"blocks.{L}.resid_pre" for L in range(self.n_layers)]
        out = self._trace(tokens, hooks, keep=entries)
        layers = [self.info(s).layer for s in out["wrote"]]
        written = max((L for L in layers if L is not None), default=-1)
        past = RemotePast((), (), 1, tokens=tokens.detach().cpu(),
                          entries=tuple(out["kept"][s] for s in entries),
                          t=tokens.shape[1], written=written)
        return out["logits"], past

    def _resume(self, past: Past, resid: Tensor, layer: int, hooks: Mapping[str, HookFn],
                stop: int | None, last_mlp: bool) -> Tensor:
        """One trace over positions ``0 .. t+q-1``: block ``layer`` takes the kept residual at
        positions ``< t`` and ``resid`` from ``t``; hooks see positions ``t ..``; the blocks
        before ``layer`` run but what they give is replaced."""
        if not isinstance(past, RemotePast):
            raise ValueError(f"RemoteHFHandle.resume continues a RemotePast (from this handle's "
                             f"kv_run), got {type(past).__name__}")
        if past.written >= layer:
            raise ValueError(f"resume at block {layer}: the kv_run's hooks changed block "
                             f"{past.written}, whose earlier positions a remote resume "
                             f"recomputes without them; resume above block {past.written}")
        t, q = past.length, resid.shape[1]
        m, T = past.tokens.shape
        ids = torch.full((m, t + q), self.tokenizer.pad_id if self.tokenizer else 0,
                         dtype=torch.long)
        ids[:, :min(T, t + q)] = past.tokens[:, :t + q]
        entry = past.entries[layer][:, :t]
        base = {f"blocks.{layer}.resid_pre": torch.cat([entry, resid.to(entry.dtype)], 1)}
        if stop is None:
            out = self._trace(ids, hooks, base=base, t0=t, logits_to_keep=1)
            return out["logits"][:, -1]
        site = f"blocks.{stop - 1}.resid_post"
        out = self._trace(ids, hooks, base=base, t0=t, keep=[site], output="stop")
        return out["kept"][site]


def load_remote(repo_id: str, *, path: str | Path | None = None, revision: str | None = None,
                host: str | None = None, on_split: str = "warn", backend: Callable | None = None,
                log: Callable[[str], Any] | None = print) -> RemoteHFHandle:
    """A :class:`RemoteHFHandle` on the model NDIF hosts as ``repo_id`` (a Hugging Face repo id,
    e.g. ``"openai-community/gpt2"``). Its architecture is built on the meta device from its
    config, and its tokenizer loaded, from the Hub (``revision``) or from ``path`` (a local
    folder holding them; no weights needed). ``host``: the NDIF server (default: nnsight's
    ``CONFIG.API.HOST``, env ``NDIF_HOST``); the API key is nnsight's (env ``NDIF_API_KEY``).
    Nothing is sent until the first forward."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"load_remote: repo_id must be a Hugging Face repo id such as "
                         f"'openai-community/gpt2', got {repo_id!r}")
    if host is not None and not str(host).startswith(("http://", "https://")):
        raise ValueError(f"load_remote: host={host!r} must start with http:// or https://")
    from nnsight import TransformersModel
    from nnsight.schema.config import CONFIG
    from transformers import AutoTokenizer

    local = path is not None
    src = str(path) if local else repo_id
    kw = {"local_files_only": True} if local else {"revision": revision}
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    # nnsight sets padding on the tokenizer it is given: it gets its own
    lm = TransformersModel(src, task="text-generation",
                           tokenizer=AutoTokenizer.from_pretrained(src, **kw),
                           revision=None if local else revision)
    lm.repo_id, lm.revision = repo_id, revision  # what the request names
    handle = RemoteHFHandle(lm, tokenizer, repo_id, revision=revision, host=host,
                            backend=backend, on_split=on_split)
    if log is not None:
        key = "set" if CONFIG.API.APIKEY else "not set (NDIF_API_KEY)"
        log(f"remote model {repo_id} on {host or CONFIG.API.HOST} (NDIF; API key {key}): "
            f"{handle.n_layers} layers, forward passes only")
    return handle
