"""The one sentence type every NER module shares."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entity:
    """A typed span of a tokenised sentence. ``start``/``end`` are token indices, ``end`` exclusive."""
    type: str
    start: int
    end: int
    text: str


@dataclass
class Sentence:
    tokens: list[str]
    entities: list[Entity] = field(default_factory=list)
    id: str = ""

    @property
    def text(self) -> str:
        return " ".join(self.tokens)

    def gold(self, types: list[str] | None = None) -> dict[str, list[str]]:
        """Entity texts by type, in sentence order; every type in ``types`` present (possibly empty)."""
        out: dict[str, list[str]] = {t: [] for t in (types or [])}
        for e in sorted(self.entities, key=lambda e: (e.start, e.end)):
            out.setdefault(e.type, []).append(e.text)
        return out


@dataclass
class NERDataset:
    """One split of a named data set: sentences plus the entity schema with natural-language descriptions."""
    name: str
    split: str
    sentences: list[Sentence]
    types: list[str]
    descriptions: dict[str, str]

    def __len__(self) -> int:
        return len(self.sentences)
