"""Reading prompts: text -> :class:`SceneSpec`, tolerant of case, spacing and punctuation.

Grammar (``|`` alternatives, ``[]`` optional)::

    prompt    := [prefix] group (joiner group)*
    prefix    := "a photo of" | "an image of" | "a picture of" | "a drawing of" | ...
    group     := count [size] [colour] shape     count: a|an|one..twelve|digits
    size      := "big" | "large" | "small"         (also read after the colour)
    joiner    := "," | "and" | ", and" | relation
    relation  := "to the left of" | "left of" | "to the right of" | "above" | "over"
               | "on top of" | "below" | "under" | "beneath" | "next to" | "beside" | ...

A relation joins the groups on either side of it. Singular and plural nouns are both accepted
whatever the count ("two circle", "a circles").
"""

from __future__ import annotations

import re

from nodes.backends.shapeworld.spec import Group, PromptParseError, Relation, SceneSpec, validate
from nodes.backends.shapeworld.vocab import (
    COLOUR_SYNONYMS,
    COLOURS,
    NUMBER_WORDS,
    RELATION_SYNONYMS,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZE_SYNONYMS,
    SIZES,
)

_PREFIXES: tuple[tuple[str, ...], ...] = (
    *(
        (article, noun, "of")
        for article in ("a", "an")
        for noun in ("photo", "image", "picture", "drawing", "illustration", "render", "rendering")
    ),
    ("there", "is"),
    ("there", "are"),
)

_MAX_RELATION_LEN = max(len(k) for k in RELATION_SYNONYMS)


def tokenize(text: str) -> list[str]:
    """Lower-case words and commas; other punctuation is dropped."""
    text = text.lower().replace(",", " , ")
    text = re.sub(r"[^a-z0-9, ]+", " ", text)
    return text.split()


class Cursor:
    """A position in a token list, with the small readers every ShapeWorld parser shares."""

    def __init__(self, tokens: list[str], text: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.text = text

    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.tokens[i] if i < len(self.tokens) else None

    def done(self) -> bool:
        return self.pos >= len(self.tokens)

    def take(self, *words: str) -> bool:
        """Consume ``words`` if they come next."""
        if tuple(self.tokens[self.pos : self.pos + len(words)]) == words:
            self.pos += len(words)
            return True
        return False

    def take_any(self, options: tuple[tuple[str, ...], ...]) -> bool:
        return any(self.take(*words) for words in sorted(options, key=len, reverse=True))

    def error(self, expected: str) -> PromptParseError:
        word = self.peek()
        where = f"'{word}' (word {self.pos + 1})" if word is not None else "the end"
        return PromptParseError(f"cannot read {self.text!r}: expected {expected} at {where}")

    def count(self) -> int | None:
        word = self.peek()
        if word is None:
            return None
        if word.isdigit():
            self.pos += 1
            return int(word)
        if word in NUMBER_WORDS:
            self.pos += 1
            return NUMBER_WORDS[word]
        return None

    def colour(self) -> str | None:
        word = self.peek()
        word = COLOUR_SYNONYMS.get(word, word) if word else None
        if word in COLOURS:
            self.pos += 1
            return word
        return None

    def size(self) -> str | None:
        word = self.peek()
        word = SIZE_SYNONYMS.get(word, word) if word else None
        if word in SIZES:
            self.pos += 1
            return word
        return None

    def attributes(self) -> tuple[str | None, str | None]:
        """(size, colour), each optional; "a red big circle" is read as well as "a big red
        circle" since people write both."""
        size = self.size()
        colour = self.colour()
        if size is None and colour is not None:
            size = self.size()
        return size, colour

    def shape(self) -> str | None:
        word = self.peek()
        if word is None:
            return None
        shape = _shape_of(word)
        if shape is not None:
            self.pos += 1
        return shape

    def relation(self) -> str | None:
        for length in range(_MAX_RELATION_LEN, 0, -1):
            key = tuple(self.tokens[self.pos : self.pos + length])
            if len(key) == length and key in RELATION_SYNONYMS:
                self.pos += length
                return RELATION_SYNONYMS[key]
        return None

    def group(self) -> Group:
        count = self.count()
        if count is None:
            raise self.error("a count ('a', 'two', '3', ...)")
        size, colour = self.attributes()
        shape = self.shape()
        if shape is None:
            raise self.error(f"a shape ({', '.join(SHAPES)})")
        return Group(count=count, shape=shape, colour=colour, size=size)

    def scene(self, stop: tuple[str, ...] = ()) -> SceneSpec:
        """Read groups and joiners until the end, or until a word in ``stop`` where a joiner
        should come (so a caller can read what follows, e.g. "on the left"); validate."""
        groups = [self.group()]
        relations: list[Relation] = []
        while not self.done():
            relation = self.relation()
            if relation is not None:
                relations.append(Relation(len(groups) - 1, relation, len(groups)))
            elif self.peek() in (",", "and"):
                while self.take(",") or self.take("and"):
                    pass
            elif self.peek() in stop:
                break
            else:
                raise self.error("',', 'and' or a relation ('to the left of', 'above', ...)")
            groups.append(self.group())
        return validate(SceneSpec(tuple(groups), tuple(relations)))


def _shape_of(word: str) -> str | None:
    word = SHAPE_SYNONYMS.get(word, word)
    if word in SHAPES:
        return word
    if word.endswith("s") and word[:-1] in SHAPES:
        return word[:-1]
    return None


def parse_prompt(text: str) -> SceneSpec:
    """Parse a scene description; raise :class:`PromptParseError` outside the grammar."""
    tokens = tokenize(text)
    if not tokens:
        raise PromptParseError("cannot read an empty prompt")
    cursor = Cursor(tokens, text)
    cursor.take_any(_PREFIXES)
    return cursor.scene()
