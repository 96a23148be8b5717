"""A word-level vocabulary in the RoBERTa special-token layout that HERO expects.

HERO's collate pads text with id 1 and its embeddings use ``padding_idx`` 1 (RoBERTa's ``<pad>``); ``<s>`` (0) is the
CLS/BOS token, ``</s>`` (2) the SEP/EOS token. The synthetic video corpus and ``fastvl make-data --video`` use this
layout with a small word list: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3, ``<mask>``=4, then one id per word
(lower-cased; punctuation marks are words of their own). ``meta()`` gives the official subtitle/query db meta.json
entries (BOS, EOS, SEP, CLS, PAD, MASK, UNK, v_range).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["WordVocab", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
_WORD = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


class WordVocab:
    """Word-level tokenizer: ``encode(text)`` -> ids (no special tokens added), unknown words -> ``<unk>``.

    Args:
        words: the vocabulary words (duplicates and special tokens dropped, order kept); ids start at 5.
        name: recorded as ``tokenizer`` in meta.json.
    """

    def __init__(self, words: Iterable[str], name: str = "fastvl-word"):
        self.tokens = list(SPECIAL_TOKENS)
        seen = set(self.tokens)
        for w in words:
            w = w.strip().lower()
            if w and w not in seen and not any(c.isspace() for c in w):
                seen.add(w)
                self.tokens.append(w)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.name = name

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordVocab:
        """One token per line (special tokens, if present, must be the first five lines in the layout above)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"WordVocab: vocab file {str(path)!r} does not exist")
        lines = [t.strip() for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
        if lines[:len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS):
            lines = lines[len(SPECIAL_TOKENS):]
        elif any(t in SPECIAL_TOKENS for t in lines):
            raise ValueError(f"WordVocab: {str(path)!r} has special tokens out of the layout {list(SPECIAL_TOKENS)}")
        return cls(lines, name=path.stem)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.tokens) + "\n", encoding="utf-8")
        return path

    bos_id = cls_id = 0
    pad_id = 1
    eos_id = sep_id = 2
    unk_id = 3
    mask_id = 4

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def v_range(self) -> tuple[int, int]:
        """Ids drawn for MLM's random replacement (every word, no special token)."""
        return len(SPECIAL_TOKENS), len(self.tokens)

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.tokens[int(i)] if 0 <= int(i) < len(self.tokens) else "<unk>" for i in ids)

    def token_to_id(self, token: str) -> int:
        return self.ids.get(token.lower(), self.unk_id)

    def special_ids(self) -> dict[str, int]:
        return {"BOS": self.bos_id, "EOS": self.eos_id, "SEP": self.sep_id, "CLS": self.cls_id, "PAD": self.pad_id,
                "MASK": self.mask_id, "UNK": self.unk_id}

    def meta(self) -> dict:
        """The meta.json entries of the official HERO text dbs."""
        return {**self.special_ids(), "v_range": list(self.v_range), "tokenizer": self.name,
                "vocab_size": self.vocab_size}
