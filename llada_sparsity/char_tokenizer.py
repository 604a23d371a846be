"""A character-level tokenizer for the embedded LLaDA model (printable ASCII + specials).

Ids: 0 = end of text (also padding), 1 = unknown character, 2.. = the characters of
``vocab.json``, and the mask id after them.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

VOCAB_FILE = "char_vocab.json"


class CharTokenizer:
    eos_token_id = 0
    pad_token_id = 0
    unk_token_id = 1

    def __init__(self, characters: str):
        self.characters = characters
        self._ids = {c: i + 2 for i, c in enumerate(characters)}
        self.mask_token_id = len(characters) + 2
        self.vocab_size = len(characters) + 3

    @classmethod
    def default(cls) -> "CharTokenizer":
        return cls("".join(sorted(set(string.printable) - set("\x0b\x0c\r"))))

    @classmethod
    def from_dir(cls, path: str | Path) -> "CharTokenizer":
        return cls(json.loads((Path(path) / VOCAB_FILE).read_text())["characters"])

    def save(self, path: str | Path) -> None:
        (Path(path) / VOCAB_FILE).write_text(json.dumps({"characters": self.characters}) + "\n")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self._ids.get(c, self.unk_token_id) for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if 2 <= i < self.mask_token_id:
                out.append(self.characters[i - 2])
            elif not skip_special_tokens:
                out.append({0: "<eos>", 1: "<unk>"}.get(i, "<mask>"))
        return "".join(out)

    def __call__(self, text: str, **kwargs) -> dict:
        return {"input_ids": self.encode(text)}
