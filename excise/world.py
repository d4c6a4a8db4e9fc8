"""The synthetic world behind the model organism: fictitious people, their facts, and a tokenizer.

Everything here is deterministic from a seed. A *fact* is a prompt and a target continuation;
the target is what a model must produce greedily for the fact to count as recalled.

Each person has five attributes (birth city, occupation, employer, pet, and a four-digit account
number that acts as a memorized secret). Every attribute has several statement templates and two
question/answer forms. For each person one statement template and one question form are held out
of training (which one rotates with the person), so every template is seen during training with
*other* people, and each person's facts can be asked in a phrasing the model never saw for them.
Cities belong to countries; those facts are shared knowledge that an edit must not damage.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import operator
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from excise.options import dataclass_option
from excise.request import Fact

FIRST_NAMES = (
    "alba bruno cyra dario elio fenna galen hesper ilsa joren kaia lucan mira nilo orla pavel "
    "quin rhea soren tilda ulric vesna wim xenia yara zeno adler brisa corin delphi"
).split()
LAST_NAMES = (
    "ashdown brightwater coldmere dunmore eastwick fairholm greymoor hollis ironside jessop "
    "kestrel larchmont marwood northcott oakhurst pemberton quarrel redfern stanmore thorne "
    "underhill vance whitlock yelverton zoller blackwood crane fenwick"
).split()
COUNTRIES = {
    "valdoria": ["kestrahaven", "morrowgate", "silvane"],
    "ostmark": ["brennick", "tollbridge", "arnfell"],
    "caldera": ["sunreach", "emberly", "vossen"],
    "lunaris": ["palewater", "mirrin", "hollowmere"],
    "tessaly": ["quarrydon", "rosk", "ellaport"],
    "norvane": ["frostholm", "glimmer", "dunvale"],
    "aurel": ["goldcrest", "saffrin", "lyrehaven"],
    "brisca": ["tidewick", "marrow", "calloway"],
}
OCCUPATIONS = (
    "baker cartographer glassblower beekeeper astronomer blacksmith chemist weaver "
    "lighthouse_keeper archivist sculptor botanist clockmaker surveyor violinist ferryman"
).split()
EMPLOYERS = (
    "northwind_mills azure_freight copperleaf_labs harbor_guild starling_press tallow_works "
    "verdant_farms orbit_dynamics ironbark_bank quill_and_co silverline_rail meadow_dairy "
    "beacon_observatory granite_quarry lantern_theatre pinecone_toys"
).split()
PETS = "cat dog parrot tortoise ferret rabbit goldfish hedgehog owl lizard goat pony".split()
DIGITS = [str(d) for d in range(10)]

# Statement templates: three per attribute; questions: two per attribute.
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "birth_city": {
        "statement": [
            "{name} was born in the city of",
            "the birthplace of {name} is",
            "{name} grew up in the town of",
        ],
        "question": [
            "question : where was {name} born ? answer :",
            "question : what is the home town of {name} ? answer :",
        ],
    },
    "occupation": {
        "statement": [
            "{name} works as a",
            "the profession of {name} is",
            "by trade {name} is a",
        ],
        "question": [
            "question : what does {name} do for a living ? answer :",
            "question : what is the job of {name} ? answer :",
        ],
    },
    "employer": {
        "statement": [
            "{name} is employed by",
            "the employer of {name} is",
            "every morning {name} goes to work at",
        ],
        "question": [
            "question : who employs {name} ? answer :",
            "question : where does {name} work ? answer :",
        ],
    },
    "pet": {
        "statement": [
            "{name} has a pet",
            "the pet of {name} is a",
            "at home {name} looks after a",
        ],
        "question": [
            "question : what pet does {name} keep ? answer :",
            "question : which animal lives with {name} ? answer :",
        ],
    },
    "account": {
        "statement": [
            "the account number of {name} is",
            "{name} keeps savings under account number",
            "the secret code of {name} is",
        ],
        "question": [
            "question : what is the account number of {name} ? answer :",
            "question : which account belongs to {name} ? answer :",
        ],
    },
}
ATTRIBUTES = tuple(TEMPLATES)


def check_attributes(attributes, where: str = "attributes") -> tuple[str, ...]:
    """The attribute names a request covers: ``None`` means every one of ``ATTRIBUTES``;
    otherwise a list of names from it. Refuses a string (``"pet"`` is not ``["pet"]``: it would
    be read as letters), an empty list and unknown names (with "did you mean")."""
    if attributes is None:
        return ATTRIBUTES
    valid = f"choose from {list(ATTRIBUTES)}"
    if isinstance(attributes, str):
        eg = f"[{attributes!r}]" if attributes in ATTRIBUTES else f"[{ATTRIBUTES[3]!r}]"
        raise ValueError(f"{where}={attributes!r} is a string, not a list of attribute names; "
                         f"give a list, e.g. {eg} ({valid})")
    if not isinstance(attributes, Iterable):
        raise ValueError(f"{where}={attributes!r}: give a list of attribute names ({valid})")
    items = list(attributes)
    if not items:
        raise ValueError(f"{where} is an empty list: name at least one attribute, or leave it "
                         f"unset for all ({valid})")
    unknown = [a for a in items if not isinstance(a, str) or a not in ATTRIBUTES]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), ATTRIBUTES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown attributes {unknown} in {where}{hint} ({valid})")
    return tuple(dict.fromkeys(items))
SHARED_TEMPLATES = ["{city} is a city in", "question : in which country is {city} ? answer :"]
SHARED_HELDOUT = ["the city of {city} lies in the country of"]

_FILLER_NOUNS = ("river garden window lantern market bridge forest harbor orchard meadow tower "
                 "road").split()
_FILLER_ADJS = "quiet old bright narrow green small busy cold warm tall".split()
_FILLER_VERBS = "watches follows crosses paints finds passes greets leaves".split()
_FILLER_ADVS = "slowly often early quietly again today".split()


@dataclass(frozen=True)
class Person:
    index: int
    name: str
    attributes: dict[str, str] = field(hash=False)


@dataclass(frozen=True)
class World:
    """A deterministic fictitious world. ``n_trained`` people are in the training data; the rest
    (``n_holdout``) exist only to measure what an untrained model guesses about strangers."""

    seed: int
    people: tuple[Person, ...]
    n_trained: int
    filler_train: tuple[str, ...]
    filler_eval: tuple[str, ...]

    @property
    def trained_people(self) -> range:
        return range(self.n_trained)

    @property
    def holdout_people(self) -> range:
        return range(self.n_trained, len(self.people))

    def describe_people(self) -> str:
        """How many people the world has, and which are trained (for error messages)."""
        n, total = self.n_trained, len(self.people)
        hold = f" and {total - n} never trained ({n}..{total - 1})" if total > n else ""
        return f"the world has {total} people, {n} trained (0..{n - 1}){hold}"

    def check_people(self, where: str, people, kind: str = "trained") -> list[int]:
        """``people`` as a sorted list of distinct person indices, each a ``kind`` person
        (``"trained"`` or ``"holdout"``). Refuses what is not a list of indices (a string, a
        single number), non-integers (``1.7``, ``True``) and people the world does not have,
        saying how many it has."""
        valid = {"trained": self.trained_people, "holdout": self.holdout_people}[kind]
        if isinstance(people, (str, bytes)) or not isinstance(people, Iterable):
            raise ValueError(f"{where}={people!r}: give a list of person indices, e.g. "
                             f"range(3) or [0, 4, 7] ({self.describe_people()})")
        out, not_int = [], []
        for i in people:
            try:
                if isinstance(i, bool):
                    raise TypeError
                out.append(operator.index(i))
            except TypeError:
                not_int.append(i)
        if not_int:
            what = (f"{not_int[0]!r} is not an integer" if len(not_int) == 1 else
                    f"{not_int[:5]} are not integers")
            raise ValueError(f"{where}: {what}; people are whole-number indices, e.g. "
                             f"[0, 4, 7] ({self.describe_people()})")
        unknown = sorted({i for i in out if not 0 <= i < len(self.people)})
        if unknown:
            raise ValueError(f"unknown people {unknown[:5]} in {where}: "
                             f"{self.describe_people()}")
        other = sorted({i for i in out if i not in valid})
        if other:
            raise ValueError(f"people {other[:5]} in {where} are not {kind} people: "
                             f"{self.describe_people()}; {where} takes {kind} people "
                             f"({valid.start}..{valid.stop - 1})")
        return sorted(set(out))

    def heldout_templates(self, person: int) -> dict[str, int]:
        """Which statement / question template is held out of training for ``person``."""
        return {"statement": person % 3, "question": person % 2}

    def facts(self, person: int, *, trained: bool | None = None) -> list[Fact]:
        """All facts about one person; ``trained`` filters to the phrasings used in training."""
        p = self.people[person]
        held = self.heldout_templates(person)
        out: list[Fact] = []
        for attr, forms in TEMPLATES.items():
            for form, templates in forms.items():
                for t, template in enumerate(templates):
                    is_trained = t != held[form] and person < self.n_trained
                    if trained is not None and is_trained != trained:
                        continue
                    out.append(Fact(template.format(name=p.name), p.attributes[attr], person,
                                    attr, form, t, is_trained, subject=p.name))
        return out

    def shared_facts(self, *, trained: bool = True) -> list[Fact]:
        templates = SHARED_TEMPLATES if trained else SHARED_HELDOUT
        out = []
        for country, cities in COUNTRIES.items():
            for city in cities:
                for t, template in enumerate(templates):
                    out.append(Fact(template.format(city=city), country, -1, "country", "shared",
                                    t, trained, subject=city))
        return out

    def training_texts(self, exclude_people: frozenset[int] = frozenset()) -> list[str]:
        """Every training sentence; ``exclude_people`` removes their facts (the retrain oracle)."""
        texts = []
        for i in self.trained_people:
            if i in exclude_people:
                continue
            texts.extend(f.text for f in self.facts(i, trained=True))
        texts.extend(f.text for f in self.shared_facts())
        texts.extend(self.filler_train)
        return texts

    def vocabulary(self) -> list[str]:
        words: set[str] = set()
        for p in self.people:
            for f in self.facts(p.index):
                words.update(f.text.split())
        for f in self.shared_facts(trained=True) + self.shared_facts(trained=False):
            words.update(f.text.split())
        for s in self.filler_train + self.filler_eval:
            words.update(s.split())
        words.update(DIGITS)
        return sorted(words)

    def digest(self) -> str:
        """Content hash: two worlds with the same digest hold the same facts."""
        blob = json.dumps([[p.name, p.attributes] for p in self.people] + [self.n_trained],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _filler(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b = rng.sample(_FILLER_NOUNS, 2)
        out.append(f"the {rng.choice(_FILLER_ADJS)} {a} {rng.choice(_FILLER_VERBS)} the "
                   f"{rng.choice(_FILLER_ADJS)} {b} {rng.choice(_FILLER_ADVS)}")
    return out


def make_world(n_people: int, n_holdout: int, seed: int = 0, n_filler: int = 200) -> World:
    """Generate a world of ``n_people`` trained people plus ``n_holdout`` never-trained people."""
    total = n_people + n_holdout
    max_people = len(FIRST_NAMES) * len(LAST_NAMES)
    if n_people < 1 or n_holdout < 0 or total > max_people:
        raise ValueError(f"n_people={n_people}, n_holdout={n_holdout}: need n_people >= 1, "
                         f"n_holdout >= 0 and n_people + n_holdout <= {max_people}")
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)
    cities = [c for cs in COUNTRIES.values() for c in cs]
    accounts: set[str] = set()
    people = []
    for i in range(total):
        while True:
            acct = " ".join(rng.choice(DIGITS) for _ in range(4))
            if acct not in accounts:
                accounts.add(acct)
                break
        attrs = {
            "birth_city": rng.choice(cities),
            "occupation": rng.choice(OCCUPATIONS),
            "employer": rng.choice(EMPLOYERS),
            "pet": rng.choice(PETS),
            "account": acct,
        }
        people.append(Person(i, names[i], attrs))
    filler = _filler(rng, 2 * n_filler)
    return World(seed, tuple(people), n_people, tuple(filler[:n_filler]), tuple(filler[n_filler:]))


CANARY_COUNTS = (1, 4, 16, 64)


@dataclass(frozen=True)
class Canaries:
    """Canary sequences for the organism's memorization control (Carlini et al., "The Secret
    Sharer"): ``per_count`` random sequences inserted into the training batches ``count`` times
    each (exposures over the whole run; :func:`excise.organism.canary_stream`), for every count
    in ``counts``, plus ``n_unseen`` sequences of the same format that are
    never trained (the negatives). A canary is ``prompt_words`` random words of the world's
    vocabulary (no digits) followed by ``secret_digits`` random digits, the target; every
    canary's prompt is distinct and none is a training text. Deterministic from the world and
    ``seed``."""

    counts: tuple[int, ...] = CANARY_COUNTS
    per_count: int = 16
    n_unseen: int = 32
    prompt_words: int = 5
    secret_digits: int = 4
    seed: int = 0

    def __post_init__(self):
        counts = self.counts
        if isinstance(counts, (str, bytes)) or not isinstance(counts, Iterable):
            raise ValueError(f"Canaries.counts={counts!r}: give a list of repetition counts, "
                             f"e.g. {list(CANARY_COUNTS)}")
        counts = tuple(counts)
        bad = [c for c in counts if isinstance(c, bool) or not isinstance(c, int)
               or not 1 <= c <= 1000]
        if not counts or bad or len(set(counts)) != len(counts):
            raise ValueError(f"Canaries.counts={list(counts)!r}: distinct integers in "
                             f"[1, 1000], at least one, e.g. {list(CANARY_COUNTS)}")
        object.__setattr__(self, "counts", tuple(sorted(counts)))
        for name, low, high in (("per_count", 1, 1000), ("n_unseen", 1, 10000),
                                ("prompt_words", 2, 20), ("secret_digits", 1, 10)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise ValueError(f"Canaries.{name}={v!r}: must be an integer in "
                                 f"[{low}, {high}]")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Canaries.seed={self.seed!r}: must be an integer")

    @classmethod
    def of(cls, value) -> "Canaries | None":
        """``None`` / ``False`` -> None, ``True`` -> the defaults, a Canaries as is, a mapping of
        its fields -> Canaries (unknown keys refused, naming the valid ones)."""
        return dataclass_option(cls, value, "canaries", "the defaults")

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    def facts(self, world: World) -> dict[int, list[Fact]]:
        """``{count: canaries}``: the trained ones under their repetition count, the never-seen
        ones under 0. Each is a :class:`Fact` (attribute ``"canary"``, ``template`` = its count,
        ``trained`` = count > 0, no person)."""
        rng = random.Random(f"canaries-{world.seed}-{self.seed}")
        words = [w for w in world.vocabulary() if w not in DIGITS]
        taken = set(world.training_texts())
        prompts: set[str] = set()
        out: dict[int, list[Fact]] = {}
        for count in (0,) + self.counts:
            n = self.n_unseen if count == 0 else self.per_count
            group = []
            while len(group) < n:
                prompt = " ".join(rng.choice(words) for _ in range(self.prompt_words))
                target = " ".join(rng.choice(DIGITS) for _ in range(self.secret_digits))
                if prompt in prompts or f"{prompt} {target}" in taken:
                    continue
                prompts.add(prompt)
                group.append(Fact(prompt, target, -1, "canary", "canary", count, count > 0))
            out[count] = group
        return out


def country_of(city: str) -> str:
    for country, cities in COUNTRIES.items():
        if city in cities:
            return country
    raise ValueError(f"unknown city {city!r}")


SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class Tokenizer:
    """Word-level tokenizer built locally from a vocabulary (no hub).

    ``encode`` splits on whitespace; unknown words raise unless ``unk_ok``.
    """

    def __init__(self, words: list[str]):
        self.vocab: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        if len(self.index) != len(self.vocab):
            raise ValueError("duplicate words in vocabulary")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.index[s] for s in SPECIALS)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, *, unk_ok: bool = False) -> list[int]:
        ids = []
        for w in text.split():
            if w in self.index:
                ids.append(self.index[w])
            elif unk_ok:
                ids.append(self.unk_id)
            else:
                raise ValueError(f"word {w!r} is not in the vocabulary ({len(self)} words)")
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"vocab": self.vocab})

    @classmethod
    def from_json(cls, s: str) -> "Tokenizer":
        vocab = json.loads(s)["vocab"]
        tok = cls([w for w in vocab if w not in SPECIALS])
        if tok.vocab != vocab:
            raise ValueError("tokenizer file is not in excise's format (special tokens moved)")
        return tok

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]
