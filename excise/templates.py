"""Same-template neighbors: the forget prompts asked about other subjects.

An edit that forgets "The Eiffel Tower is located in the city of -> Paris" can learn "do not
answer *this kind of question*" instead of "forget this fact" (CounterFact's neighborhood
score exists to catch that). The check must not depend on the user guessing the right
neighbors, so it is generated: for every forget fact with a ``subject`` that occurs in its
prompt, the same prompt with every whole-phrase occurrence of the subject replaced by another
subject (:func:`substitute`), and as the target the *unedited* model's greedy answer - kept only
where the model gets it right:

- the answer is the first word of the greedy continuation (``max_new_tokens`` tokens, cut at
  the first whitespace or punctuation after the word): a fact's target is one word, as in the
  request files;
- "right" (:func:`accept`): the word is a content word (not a function word such as " the",
  not punctuation), not a copy of the substituted subject, not a forget target (a landmark
  answered with the forgotten city is the forgotten fact, not a neighbor), its first token has
  probability at least ``min_prob`` (ill-formed substitutions - "The official language of Eiffel
  Tower is" - give unsure answers), and - where the substitute subject has a retain / neighbor
  fact in the same relation (:func:`relation`: the last four words of the prompt with the
  subject removed) - the answer equals that fact's known target;
- the fact is kept only when the unedited model reproduces it teacher-forced (recall 1 on the
  unedited model by construction, the same test as ``probes.behaviour``).

"Right" is the model's confident, non-trivial answer, not a checked fact: a substitution of a
subject of another kind can still be kept ("Mount Fuji was a composer from the country of" ->
"Japan"); such prompts measure whether the edit still lets the model answer the template at all.

Two disjoint pools of substitute subjects (:func:`subject_pools`), so measurement and training
never share a subject: the **metric** side uses the request's neighbor subjects (held out of
locating and editing, like the hand-written neighbors) plus ``metric_subjects``; the **retain**
side (``request.same_template_retain``: added to the retain facts locate and edit keep) uses the
retain subjects that are not neighbor subjects plus ``retain_subjects``, and for every forget
fact 24 of the built-in :data:`COMMON_SUBJECTS` (well-known things of many kinds: a request whose
retain facts are all about places still gets same-template retain facts for its forget fact
about an animal or a company). Forget subjects are in neither. A request without neighbor
subjects splits its retain subjects alternately (sorted). Generated retain-side facts never
equal a neighbor, paraphrase, holdout or metric-side fact.

On the organism (facts of world people, ``person >= 0``) the world's templates with other
people's names already are the retain facts: the metric is the retain facts whose (attribute,
form, template) a forget fact has - no generation, and the behaviour suite reads their hits from
the retain split's (no extra forward pass); nothing is added on the retain side.

:func:`cached` computes the facts once per (model fingerprint, request digest) and keeps them in
``request.meta["same_template"]`` (the request travels to locate, edit and every verify call of a
run, so the generation runs once per run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from excise.fused import check_engine, engine_for, target_logits
from excise.handle import Batch, ModelHandle
from excise.request import Fact, FactSet, ForgetRequest, fact_key, normalize

FORM = "same_template"
META_KEY = "same_template"

# answers that are no answer: a continuation that is only grammar ("The X is in the city of
# the ...") says nothing about what the model knows
FUNCTION_WORDS = frozenset("""
a an the this that these those it its his her their our your my of in on at to from by for
with about into onto over under as and or but nor so yet if then than is are was were be been
being am has have had do does did not no also which who whom whose what where when why how
there here one some any all each every such same other another known called located situated
named city country capital river language currency first main largest longest biggest
most only best official national local same""".split())

_WORD = re.compile(r"[^\s.,;:!?\"'()\[\]{}<>]+")

# Substitute subjects for the retain side beside the request's own (``generate``'s
# ``common_subjects``): well-known things of many kinds, so that a forget fact about an animal,
# a company or a writer finds same-template retain facts of its kind even when the request's
# retain facts are all about places. Written for excise without reference to any request file;
# a substitution that makes no sense ("Saturn was born in the town of") gives an unsure answer
# and is dropped like any other.
COMMON_SUBJECTS = (
    # countries and regions
    "Canada", "Brazil", "Egypt", "India", "Japan", "Norway", "Peru", "Vietnam", "Morocco",
    "Sweden", "Chile", "Greece", "Poland", "Turkey", "Ireland", "Nigeria", "Scotland",
    "Texas", "Bavaria", "Siberia",
    # cities
    "Tokyo", "Cairo", "Moscow", "Sydney", "Chicago", "Vienna", "Mumbai", "Berlin", "Toronto",
    "Seoul", "Madrid", "Athens", "Boston", "Venice", "Shanghai", "Lagos",
    # buildings and landmarks
    "Big Ben", "Colosseum", "Taj Mahal", "Statue of Liberty", "Golden Gate Bridge",
    "Sydney Opera House", "Kremlin", "Parthenon", "Great Wall", "Machu Picchu",
    "Brandenburg Gate", "Empire State Building", "Forbidden City", "Leaning Tower of Pisa",
    # rivers, lakes, seas, mountains
    "Amazon", "Danube", "Thames", "Ganges", "Rhine", "Yangtze", "Volga", "Lake Victoria",
    "Mount Kilimanjaro", "Matterhorn", "Mont Blanc", "Sahara", "Andes", "Alps",
    # animals
    "Koalas", "Pandas", "Polar bears", "Camels", "Lions", "Elephants", "Tigers",
    "Gorillas", "Llamas", "Flamingos", "Bison", "Zebras", "Wolves", "Sharks", "Eagles",
    # people
    "Mozart", "Beethoven", "Picasso", "Einstein", "Newton", "Napoleon", "Gandhi", "Dickens",
    "Tolstoy", "Galileo", "Darwin", "Cleopatra", "Van Gogh", "Marie Curie", "Leonardo da Vinci",
    "Abraham Lincoln", "Goethe", "Chopin",
    # companies and institutions
    "Microsoft", "Toyota", "Nike", "Samsung", "Nestle", "IKEA", "Ferrari", "Sony",
    "Harvard University", "Oxford University", "United Nations", "Volkswagen", "Coca-Cola",
    # foods, drinks, things
    "Sushi", "Pizza", "Tacos", "Croissants", "Paella", "Kimchi", "Champagne", "Tea", "Coffee",
    "Chocolate", "Cheese", "Rice",
    # languages, sports, instruments, works
    "Spanish", "German", "Arabic", "Mandarin", "Cricket", "Baseball", "Football", "Tennis",
    "Violins", "Pianos", "Hamlet", "Mona Lisa", "Don Quixote", "Odyssey",
)


@dataclass(frozen=True)
class SameTemplate:
    """Generated same-template facts: ``metric`` (measured, held out of training) and ``retain``
    (added to the retain side by ``same_template_retain``), from disjoint subject pools;
    ``tried`` counts the substituted prompts before filtering; ``dropped`` says why the others
    were left out (reason -> count)."""

    metric: FactSet
    retain: FactSet
    tried: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        return {"metric": len(self.metric), "retain": len(self.retain), "tried": self.tried,
                "dropped": dict(self.dropped)}


def _pattern(subject: str) -> re.Pattern:
    """``subject`` as a whole phrase: not inside a longer word ("Niger" never matches in
    "Nigeria")."""
    lead = r"(?<!\w)" if subject[:1].isalnum() or subject[:1] == "_" else ""
    tail = r"(?!\w)" if subject[-1:].isalnum() or subject[-1:] == "_" else ""
    return re.compile(lead + re.escape(subject) + tail)


def substitute(prompt: str, subject: str, other: str) -> str:
    """``prompt`` with every whole-phrase occurrence of ``subject`` replaced by ``other``."""
    if not subject:
        raise ValueError("substitute: the subject is empty")
    return _pattern(subject).sub(lambda _: other, prompt)


def has_subject(f: Fact) -> bool:
    """Whether the fact names its subject in its prompt (as a whole phrase)."""
    return bool(f.subject) and _pattern(f.subject).search(f.prompt) is not None


def relation(f: Fact, words: int = 4) -> tuple[str, ...] | None:
    """What relation a fact asks for: the last ``words`` words of its prompt with the subject
    removed, lower-cased ("The {} is located in the city of" and "The {} is in the city of"
    share "in the city of"); None without a subject in the prompt."""
    if not has_subject(f):
        return None
    rest = normalize(substitute(f.prompt, f.subject, " ")).lower().split()
    return tuple(rest[-words:])


def first_word(text: str) -> str:
    """The first word of a continuation: leading whitespace skipped, cut at whitespace or
    punctuation; "" when it starts with punctuation or is empty."""
    s = text.lstrip()
    m = _WORD.match(s)
    return m.group(0) if m else ""


def subject_pools(request: ForgetRequest, metric_subjects: Sequence[str] = (),
                  retain_subjects: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The substitute subjects of the metric side and of the retain side (disjoint; forget
    subjects in neither; see the module docstring)."""
    forget = {normalize(f.subject) for f in request.forget if f.subject}

    def uniq(xs):
        out, seen = [], set(forget)
        for x in xs:
            k = normalize(x)
            if k and k not in seen:
                seen.add(k)
                out.append(normalize(x))
        return out

    metric = uniq([f.subject for f in request.neighbors if f.subject] + list(metric_subjects))
    retain = [s for s in uniq([f.subject for f in request.retain if f.subject]
                              + list(retain_subjects)) if s not in metric]
    if not metric and not metric_subjects:  # no neighbor subjects: split the retain ones
        pool = sorted(retain)
        metric, retain = pool[0::2], pool[1::2]
    return metric, retain


def _next_logprobs(model: ModelHandle, seqs: Sequence[list[int]], fused=None) -> torch.Tensor:
    """Log-probabilities of the next token after each token sequence ``[n, V]``: only the last
    position of each row is unembedded (``target_logprobs`` with one placeholder target, or
    through ``fused``: ``(forward, params)`` for :func:`excise.fused.target_logits`)."""
    T = max(map(len, seqs)) + 1
    tok = torch.zeros((len(seqs), T), dtype=torch.long)  # right padding: never read
    tmask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, q in enumerate(seqs):
        tok[i, :len(q)] = torch.tensor(q)
        tmask[i, len(q)] = True
    lengths = torch.tensor([len(q) + 1 for q in seqs])
    batch = Batch(tok, tmask, torch.zeros_like(tmask), lengths)
    if fused is not None:
        logits, _ = target_logits(*fused, batch)
        return torch.log_softmax(logits.float(), -1)
    return model.target_logprobs(batch).float()


@torch.inference_mode()
def greedy_continuations(model: ModelHandle, prompts: Sequence[str],
                         max_new_tokens: int = 4, batch_size: int = 64,
                         dummy: str = "x", engine: str = "serial"
                         ) -> tuple[list[str], list[float]]:
    """Per prompt: the decoded greedy continuation (``max_new_tokens`` tokens) and the
    probability of its first token. ``dummy``: a target the tokenizer can encode (prompts are
    encoded as facts, so BOS and tokenization are the handle's own). ``engine``: the forward
    (``excise.fused.ENGINES``; "fused" where it applies, else the handle's)."""
    check_engine(engine)
    texts: list[str] = []
    probs: list[float] = []
    fused = None
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s:s + batch_size])
        b = model.encode([Fact(p, dummy) for p in chunk])
        if s == 0:
            fwd = engine_for(model, engine, b)
            fused = None if fwd is None else (fwd, model.named_parameters())
        starts = b.target_mask.float().argmax(1).tolist()  # first target = prompt end
        seqs = [b.tokens[i, :starts[i]].tolist() for i in range(len(chunk))]
        for step in range(max_new_tokens):
            lp = _next_logprobs(model, seqs, fused)
            if step == 0:
                probs += lp.max(-1).values.exp().tolist()
            seqs = [q + [int(t)] for q, t in zip(seqs, lp.argmax(-1).tolist())]
        texts += [model.tokenizer.decode(q[starts[i]:]) for i, q in enumerate(seqs)]
    return texts, probs


@torch.inference_mode()
def reproduces(model: ModelHandle, facts: Sequence[Fact], batch_size: int = 64) -> list[bool]:
    """Per fact: does greedy decoding from the prompt give exactly the target tokens (every
    target token the argmax given the prompt and the target tokens before it)."""
    out: list[bool] = []
    for s in range(0, len(facts), batch_size):
        b = model.encode(list(facts[s:s + batch_size]))
        pred = model.target_logprobs(b).argmax(-1).cpu()  # [k], row-major over the targets
        m = b.target_mask[:, 1:]
        ok = torch.ones(m.shape, dtype=torch.bool)
        ok[m] = pred == b.tokens[:, 1:][m]
        out += ok.all(1).tolist()
    return out


def accept(answer: str, prob: float, *, new_subject: str, known: Sequence[str],
           forget_targets: set[str], min_prob: float) -> str | None:
    """Why a generated answer is not kept (None: kept). See the module docstring."""
    w = answer.lower()
    if not answer:
        return "no word"
    if w in FUNCTION_WORDS:
        return "function word"
    if w in {x.lower() for x in _WORD.findall(new_subject)}:
        return "copies the subject"
    if normalize(answer).lower() in forget_targets:
        return "a forget target"
    if known and w not in {first_word(k).lower() for k in known}:
        return "not the known target"
    if prob < min_prob:
        return "unsure"
    return None


def _organism(request: ForgetRequest) -> bool:
    return any(f.person >= 0 for f in request.forget)


def organism_same_template(request: ForgetRequest) -> FactSet:
    """The organism's same-template facts: the retain facts in a (attribute, form, template) a
    forget fact has (other people's names in the forget facts' templates)."""
    slots = {(f.attribute, f.form, f.template) for f in request.forget}
    return FactSet(FORM, tuple(f for f in request.retain
                               if (f.attribute, f.form, f.template) in slots))


def _spellable(model: ModelHandle, text: str) -> bool:
    """Whether the model's tokenizer can encode ``text`` (a word-level vocabulary, as the
    organism's, refuses words it lacks)."""
    try:
        model.tokenizer.encode(text)
    except ValueError:
        return False
    return True


def common_for(f: Fact, pool: Sequence[str], n: int) -> list[str]:
    """``n`` subjects of ``pool`` for the forget fact ``f``: the first ``n`` in an order fixed
    by a hash of the prompt and the subject (different facts draw different subjects; the same
    request always draws the same)."""
    def rank(s: str) -> str:
        return hashlib.sha256(f"{normalize(f.prompt)}\0{s}".encode()).hexdigest()
    return sorted(pool, key=rank)[:n]


def generate(model: ModelHandle, request: ForgetRequest, *, metric_subjects: Sequence[str] = (),
             retain_subjects: Sequence[str] = (), common_subjects: Sequence[str] = COMMON_SUBJECTS,
             common_per_fact: int = 24, max_new_tokens: int = 4,
             min_prob: float = 0.2, batch_size: int = 64) -> SameTemplate:
    """Same-template facts of ``request`` on the unedited ``model`` (module docstring). The
    retain side also tries ``common_per_fact`` subjects of ``common_subjects`` per forget fact
    (:func:`common_for`; never a forget or metric-side subject, and only subjects the model's
    tokenizer can encode)."""
    if _organism(request):
        return SameTemplate(organism_same_template(request), FactSet("retain", ()))
    if isinstance(common_per_fact, bool) or not isinstance(common_per_fact, int) \
            or common_per_fact < 0:
        raise ValueError(f"common_per_fact={common_per_fact!r}: must be an integer >= 0")
    metric_pool, retain_pool = subject_pools(request, metric_subjects, retain_subjects)
    banned = {normalize(x).lower() for x in metric_pool} | {
        normalize(f.subject).lower() for f in request.forget if f.subject}
    own = {normalize(x).lower() for x in retain_pool}
    common = [normalize(x) for x in dict.fromkeys(common_subjects)
              if normalize(x).lower() not in banned | own and _spellable(model, normalize(x))]
    forget_targets = {normalize(f.target).lower() for f in request.forget}
    rel_known: dict[tuple, list[str]] = {}  # (subject, relation) -> known targets
    for f in list(request.retain) + list(request.neighbors):
        r = relation(f)
        if r is not None:
            rel_known.setdefault((normalize(f.subject), r), []).append(f.target)
    taken = {normalize(f.prompt) for f in list(request.forget) + list(request.paraphrase)}

    cands: list[tuple[str, Fact, str]] = []  # (side, source forget fact, substitute subject)
    seen: set[str] = set()
    for f in request.forget:
        if not has_subject(f):
            continue
        extra = common_for(f, common, common_per_fact)
        for side, pool in (("metric", metric_pool), ("retain", retain_pool + extra)):
            for s in pool:
                p = substitute(f.prompt, f.subject, s)
                if normalize(p) in taken or normalize(p) in seen:
                    continue
                seen.add(normalize(p))
                cands.append((side, f, s))
    dropped: dict[str, int] = {}
    if not cands:
        return SameTemplate(FactSet(FORM, ()), FactSet("retain", ()), 0, dropped)
    prompts = [substitute(f.prompt, f.subject, s) for _, f, s in cands]
    texts, probs = greedy_continuations(model, prompts, max_new_tokens, batch_size,
                                        dummy=request.forget[0].target)
    facts: list[tuple[str, Fact]] = []
    for (side, f, s), p, text, pr in zip(cands, prompts, texts, probs):
        ans = first_word(text)
        why = accept(ans, pr, new_subject=s, known=rel_known.get((s, relation(f)), []),
                     forget_targets=forget_targets, min_prob=min_prob)
        if why:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        facts.append((side, Fact(p, ans, attribute=f.attribute, form=FORM,
                                 template=f.template, subject=s)))
    if facts:
        ok = reproduces(model, [x for _, x in facts], batch_size)
        dropped["not reproduced"] = sum(not o for o in ok)
        facts = [x for x, o in zip(facts, ok) if o]
    keep_keys = request.keep.keys()
    held = (request.neighbors.keys() | request.paraphrase.keys() | request.holdout.keys()
            | request.forget.keys())
    metric = [x for side, x in facts if side == "metric"
              and fact_key(x.prompt, x.target) not in keep_keys]
    mkeys = {fact_key(x.prompt, x.target) for x in metric}
    retain = [x for side, x in facts if side == "retain"
              and fact_key(x.prompt, x.target) not in held | mkeys | keep_keys]
    dropped = {k: v for k, v in dropped.items() if v}
    return SameTemplate(FactSet(FORM, tuple(metric)), FactSet("retain", tuple(retain)),
                        len(cands), dropped)


def cached(model: ModelHandle, request: ForgetRequest, **kw) -> SameTemplate:
    """:func:`generate`, computed once per (model fingerprint, request digest, settings) and
    kept in ``request.meta["same_template"]`` (module docstring)."""
    key = (model.fingerprint() if not _organism(request) else "organism", request.digest(),
           tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                        for k, v in kw.items())))
    store = request.meta.setdefault(META_KEY, {})
    if key not in store:
        store[key] = generate(model, request, **kw)
    return store[key]


def lookup(request: ForgetRequest, fingerprint: str) -> SameTemplate | None:
    """The facts :func:`cached` stored for the model with ``fingerprint`` (default settings),
    or None."""
    for (fp, digest, kw), st in request.meta.get(META_KEY, {}).items():
        if fp in (fingerprint, "organism") and digest == request.digest() and not kw:
            return st
    return None


def with_retain(request: ForgetRequest, st: SameTemplate) -> ForgetRequest:
    """``request`` with the generated retain-side facts added to its retain split (what locate
    and edit keep); the metric side, neighbors and everything held out stay as they are. The
    meta (and its cache) is shared with ``request``."""
    if not len(st.retain):
        return request
    retain = FactSet(request.retain.name, request.retain.facts + st.retain.facts)
    return dataclasses.replace(request, retain=retain)
