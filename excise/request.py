"""ForgetRequest: what to forget and what to keep.

A request holds sets of facts (prompt + target continuation):

- ``forget``   what must be removed;
- ``retain``   what must survive (used by locate as the contrast set, and by probes);
- ``holdout``  facts the model never trained on - the privacy baseline;
- ``neighbors`` knowledge near the forget set that must survive (optional);
- ``paraphrase`` the forget facts asked in phrasings that were never trained for them;
- ``shared``   shared world knowledge (utility);
- ``general``  general text for perplexity.

Build one from the organism (``org.request(forget_people=range(10))``, see
``excise.organism.organism_request``), from a JSONL file (``ForgetRequest.from_jsonl``) or from
Python lists (``ForgetRequest.from_lists``). A ``Fact`` is one prompt and the target
continuation a model must produce.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


def normalize(text: str) -> str:
    """``text`` as facts are compared: Unicode NFKC, whitespace runs collapsed to one space,
    stripped. Two facts that differ only in spacing (``"a  b "`` / ``"a b"``) are the same fact:
    a model sees them as the same tokens (the organism's tokenizer splits on whitespace)."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def fact_key(prompt: str, target: str) -> tuple[str, str]:
    """The identity of a fact in overlap checks: its normalised prompt and target."""
    return normalize(prompt), normalize(target)


@dataclass(frozen=True)
class Fact:
    """One prompt with the continuation a model must produce."""

    prompt: str
    target: str
    person: int = -1  # -1 for facts that belong to no person (shared knowledge, filler)
    attribute: str = ""
    form: str = ""  # "statement" | "question" | "shared" | "filler" | "custom" | "text"
    template: int = -1
    trained: bool = True
    subject: str = ""  # the words in the prompt that name who or what the fact is about

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target}"

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class FactSet:
    name: str
    facts: tuple[Fact, ...]

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self):
        return iter(self.facts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return FactSet(self.name, self.facts[i])
        return self.facts[i]

    def keys(self) -> set[tuple[str, str]]:
        """The facts' normalised ``(prompt, target)`` pairs (:func:`fact_key`): what overlap
        checks compare, so facts that differ only in whitespace count as one."""
        return {fact_key(f.prompt, f.target) for f in self.facts}

    def find(self, key: tuple[str, str]) -> Fact:
        """The first fact whose normalised key is ``key``."""
        return next(f for f in self.facts if fact_key(f.prompt, f.target) == key)

    def where(self, **conds) -> "FactSet":
        """Facts whose fields equal the given values, e.g. ``where(form="question")``."""
        keep = tuple(f for f in self.facts if all(getattr(f, k) == v for k, v in conds.items()))
        return FactSet(self.name, keep)

    def split(self, fraction: float, seed: int = 0) -> tuple["FactSet", "FactSet"]:
        """Split by owner into two parts: facts of one person stay together (facts that belong
        to no person - real facts from JSONL - are grouped by subject, else by prompt)."""
        import random

        owners = sorted({owner(f) for f in self.facts})
        random.Random(seed).shuffle(owners)
        k = max(1, min(len(owners) - 1, round(fraction * len(owners))))
        a = set(owners[:k])
        return (FactSet(self.name + "_a", tuple(f for f in self.facts if owner(f) in a)),
                FactSet(self.name + "_b", tuple(f for f in self.facts if owner(f) not in a)))


def _show(a: FactSet, b: FactSet, key: tuple[str, str]) -> str:
    """One overlapping fact as both sets hold it (both spellings when they differ)."""
    fa, fb = a.find(key), b.find(key)
    shown = f"{fa.prompt!r} -> {fa.target!r}"
    if (fa.prompt, fa.target) != (fb.prompt, fb.target):
        shown += (f" ({b.name}: {fb.prompt!r} -> {fb.target!r}; they differ only in "
                  f"whitespace or Unicode form)")
    return shown


def owner(f: Fact) -> tuple:
    """Who a fact is about: its person, else its subject (or prompt) for real facts."""
    return (0, f.person, "") if f.person >= 0 else (1, -1, f.subject or f.prompt)


@dataclass(frozen=True)
class ForgetRequest:
    forget: FactSet
    retain: FactSet
    holdout: FactSet = FactSet("holdout", ())
    neighbors: FactSet = FactSet("neighbors", ())
    paraphrase: FactSet = FactSet("paraphrase", ())
    shared: FactSet = FactSet("shared", ())
    general: tuple[str, ...] = ()
    retain_text: tuple[str, ...] = ()  # general text the model trained on and must keep (locate)
    meta: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self):
        if len(self.forget) == 0:
            raise ValueError("the forget set is empty: a ForgetRequest needs at least one fact "
                             "to forget")
        if len(self.retain) == 0:
            raise ValueError("the retain set is empty: a ForgetRequest needs facts to keep, "
                             "as the contrast for locating and the check that nothing else broke")
        # facts are compared after normalisation (whitespace, Unicode): "a  b " -> "c" in
        # retain is the fact "a b" -> "c" of the forget set
        overlap = self.forget.keys() & self.retain.keys()
        if overlap:
            raise ValueError(f"forget and retain overlap in {len(overlap)} fact(s), e.g. "
                             f"{_show(self.forget, self.retain, min(overlap))}; a fact cannot "
                             f"be both forgotten and kept")
        for name in ("holdout", "neighbors"):
            clash = getattr(self, name).keys() & self.forget.keys()
            if clash:
                raise ValueError(f"forget and {name} overlap, e.g. "
                                 f"{_show(self.forget, getattr(self, name), min(clash))}")
        # the same fact in other words: a kept fact about a forget fact's subject with its
        # target ("The Acropolis is in the city of" -> "Athens" kept while "The Acropolis is
        # located in the city of" -> "Athens" is forgotten) asks the edit for both at once
        def said(f: Fact) -> tuple[str, str]:
            return normalize(f.subject).lower(), normalize(f.target).lower()

        forgotten = {said(f): f for f in self.forget if f.subject}
        for name in ("retain", "neighbors"):
            clash = [(f, forgotten[said(f)]) for f in getattr(self, name)
                     if f.subject and said(f) in forgotten]
            if clash:
                (f, g), n = clash[0], len(clash)
                raise ValueError(
                    f"{n} {name} fact(s) restate a forget fact, e.g. {f.prompt!r} -> "
                    f"{f.target!r} restates {g.prompt!r} -> {g.target!r} (subject "
                    f"{g.subject!r}, same target): the edit would have to forget and keep the "
                    f"same answer about the same subject; drop them from {name}, or list them "
                    f"as paraphrases of the forget facts")

    @property
    def keep(self) -> FactSet:
        """What locating contrasts against and what edits train to keep: the retain facts and
        ``retain_text`` as language-model targets (every word after the first). ``neighbors``
        and ``general`` stay out: they are held out, the checks that nearby knowledge and
        general text survive an edit that never saw them."""
        text = tuple(Fact(t.split()[0], " ".join(t.split()[1:]), form="text")
                     for t in self.retain_text if len(t.split()) > 1)
        return FactSet("retain", self.retain.facts + text) if text else self.retain

    def forget_people(self) -> list[int]:
        return list(self.meta.get("forget_people", []))

    def digest(self) -> str:
        blob = json.dumps({k: [f.to_dict() for f in getattr(self, k)] for k in
                           ("forget", "retain", "holdout", "neighbors", "paraphrase", "shared")}
                          | {"general": list(self.general), "retain_text": list(self.retain_text)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in
                ("forget", "retain", "holdout", "neighbors", "paraphrase", "shared")} | {
            "general": len(self.general)}

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_lists(cls, forget: Sequence[tuple[str, str]], retain: Sequence[tuple[str, str]],
                   holdout: Sequence[tuple[str, str]] = (),
                   neighbors: Sequence[tuple[str, str]] = (),
                   general: Sequence[str] = ()) -> "ForgetRequest":
        """Build from ``(prompt, target)`` pairs."""

        def fs(name, pairs):
            out = []
            for i, pair in enumerate(pairs):
                if len(pair) != 2 or not all(isinstance(x, str) and x.strip() for x in pair):
                    raise ValueError(f"{name}[{i}] = {pair!r}: expected a (prompt, target) pair "
                                     f"of non-empty strings")
                out.append(Fact(pair[0], pair[1], form="custom"))
            return FactSet(name, tuple(out))

        if isinstance(general, str) or not all(isinstance(t, str) and t.strip()
                                               for t in general):
            raise ValueError(f"general={general!r}: expected a list of non-empty strings "
                             f"(lines of general text)")
        return cls(fs("forget", forget), fs("retain", retain), fs("holdout", holdout),
                   fs("neighbors", neighbors), general=tuple(general))

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "ForgetRequest":
        """One JSON object per line: ``{"split": "forget"|"retain"|"holdout"|"neighbors"|
        "paraphrase"|"shared", "prompt": ..., "target": ..., "subject": optional}``, or
        ``{"split": "general"|"retain_text", "text": ...}`` for general text. The file is UTF-8;
        a line that is not (or not JSON, or not an object, or misses a field) is refused naming
        the file and line (:func:`read_jsonl`)."""
        splits, texts = read_jsonl(path)
        return cls(**{k: FactSet(k, v) for k, v in splits.items()},
                   general=texts["general"], retain_text=texts["retain_text"],
                   meta={"source": str(path)})


def read_jsonl(path: str | Path
               ) -> tuple[dict[str, tuple[Fact, ...]], dict[str, tuple[str, ...]]]:
    """The rows of a JSONL request file (the format of :meth:`ForgetRequest.from_jsonl`), each
    checked, by split: ``(facts, texts)`` - ``facts[split]`` for forget / retain / holdout /
    neighbors / paraphrase / shared, ``texts["general"]`` and ``texts["retain_text"]``. Nothing
    is required to be present (a file of general text alone is read as such)."""
    splits: dict[str, list[Fact]] = {k: [] for k in ("forget", "retain", "holdout",
                                                    "neighbors", "paraphrase", "shared")}
    texts: dict[str, list[str]] = {"general": [], "retain_text": []}
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; expected a JSONL request file (one JSON "
                         f"object per line)")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
        data = data[3:]
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                             f"column {e.start + 1}); save the request file as UTF-8"
                             ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object such as {{\"split\": "
                             f"\"forget\", \"prompt\": ..., \"target\": ...}}, got a "
                             f"{_JSON_TYPES.get(type(row), type(row).__name__)}")
        split = row.get("split")
        if split in texts:
            text = row.get("text", row.get("prompt"))
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{n}: a {split!r} row needs a non-empty 'text' "
                                 f"string, got {text!r}")
            texts[split].append(text)
            continue
        if split not in splits:
            raise ValueError(f"{path}:{n}: split {split!r} is not one of "
                             f"{sorted(splits) + sorted(texts)}")
        for k in ("prompt", "target"):
            if not isinstance(row.get(k), str) or not row[k].strip():
                raise ValueError(f"{path}:{n}: missing or empty {k!r}")
        subject = row.get("subject", "")
        if not isinstance(subject, str):
            raise ValueError(f"{path}:{n}: 'subject' must be a string, got {subject!r}")
        splits[split].append(Fact(row["prompt"], row["target"], form="custom",
                                  subject=subject))
    return ({k: tuple(v) for k, v in splits.items()},
            {k: tuple(v) for k, v in texts.items()})


_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}
