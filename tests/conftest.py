"""Shared fixtures: a tiny trained organism (session-wide, own cache folder) and a planted model.

The planted model is built by hand so that the answer is known: one MLP neuron carries the
forget signal (it fires only on the forget subjects and writes their targets), everything else
is random. Every locate method must rank that neuron first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    if "EXCISE_TEST_CACHE" in os.environ:  # reuse trained tiny models between local runs
        os.environ["EXCISE_CACHE"] = os.environ["EXCISE_TEST_CACHE"]
    else:
        os.environ["EXCISE_CACHE"] = str(tmp_path_factory.mktemp("excise-cache"))
    import matplotlib

    matplotlib.use("Agg")
    yield


@pytest.fixture(scope="session")
def tiny():
    import excise

    return excise.organism("tiny", progress=False)


@pytest.fixture(scope="session")
def tiny_request(tiny):
    return tiny.request(forget_people=range(3))


@pytest.fixture(scope="session")
def tiny_oracle(tiny, tiny_request):
    return tiny.oracle(tiny_request)


@pytest.fixture()
def tiny_model(tiny):
    """A private copy of the tiny organism's model: tests may edit it freely."""
    return tiny.model.clone()


class Planted:
    def __init__(self, handle, request, layer, neuron):
        self.handle, self.request, self.layer, self.neuron = handle, request, layer, neuron

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.mlp.post"


def make_planted(n_layers: int = 2, layer: int = 1, neuron: int = 5, seed: int = 0) -> Planted:
    """A small HookedTransformer with a planted forget neuron.

    Vocabulary: subjects s0..s11 and answers a0..a11; the fact "sK" -> "aK". Subjects s0..s2 are
    the forget set. Attention is switched off (W_O = 0) so each position sees only its own
    token. Token embeddings are orthonormal. Neuron ``neuron`` of block ``layer`` reads the forget
    subjects' embeddings (bias -2 keeps it silent elsewhere) and writes the forget answers'
    unembedding directions; the retain facts are carried by the direct path embed -> unembed.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from excise.handle import TLHandle
    from excise.request import ForgetRequest
    from excise.world import Tokenizer

    n = 12
    words = [f"s{i}" for i in range(n)] + [f"a{i}" for i in range(n)]
    tok = Tokenizer(words)
    V = len(tok)
    d = 64
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d, n_heads=2, d_head=8, d_mlp=16,
                                  d_vocab=V, n_ctx=8, act_fn="relu", normalization_type=None,
                                  seed=seed, default_prepend_bos=False, device="cpu")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    E = q[:V] if V <= d else torch.randn(V, d, generator=g)
    forget = [0, 1, 2]
    with torch.no_grad():
        model.embed.W_E.copy_(E)
        model.pos_embed.W_pos.zero_()
        U = torch.zeros(d, V)
        for i in range(n):
            if i not in forget:  # retain answers: the direct path maps sK -> aK
                U[:, tok.index[f"a{i}"]] = 6.0 * E[tok.index[f"s{i}"]]
        for L in range(n_layers):
            b = model.blocks[L]
            b.attn.W_O.zero_()
            b.attn.b_O.zero_()
            b.mlp.W_in.mul_(0.05)
            b.mlp.W_out.mul_(0.05)
            b.mlp.b_in.fill_(-1.0)
            b.mlp.b_out.zero_()
        b = model.blocks[layer]
        b.mlp.W_in[:, neuron] = 0
        b.mlp.W_out[neuron, :] = 0
        for i in forget:
            b.mlp.W_in[:, neuron] += 3.0 * E[tok.index[f"s{i}"]]
        b.mlp.b_in[neuron] = -2.0
        # the neuron's output direction is a fresh direction; the forget answers read it
        spare = q[V] if V < d else torch.randn(d, generator=g)
        b.mlp.W_out[neuron, :] = spare
        for i in forget:
            U[:, tok.index[f"a{i}"]] = 6.0 * spare + 2.0 * E[tok.index[f"s{i}"]]
        model.unembed.W_U.copy_(U)
        model.unembed.b_U.zero_()
    handle = TLHandle(model, tok, name="planted")
    facts = lambda ids: [(f"s{i}", f"a{i}") for i in ids]  # noqa: E731
    req = ForgetRequest.from_lists(forget=facts(forget), retain=facts(range(3, n)))
    return Planted(handle, req, layer, neuron)


@pytest.fixture()
def planted() -> Planted:
    return make_planted()
