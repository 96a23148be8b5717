"""WordPiece tokenisation (the ``tokenizers`` library) from a BERT vocab file; nothing is downloaded.

The bert-base-cased layout: [PAD]=0, [unused1..99]=1..99, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, then
the word pieces. Text is split on whitespace and punctuation (BERT pre-tokeniser) and each word into pieces
(``##`` continuation), without adding [CLS]/[SEP] (the txt_db stores bare ids; collate adds them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = ["WordPieceTokenizer", "bert_layout_vocab", "write_vocab", "SPECIAL_IDS"]

SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def bert_layout_vocab(tokens: Iterable[str]) -> list[str]:
    """A vocab in the bert-base-cased layout: the special tokens at their ids, [unusedN] fillers, then ``tokens``
    (duplicates and special tokens removed, order kept)."""
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    seen = set(head)
    out = list(head)
    for t in tokens:
        if t and t not in seen and not any(c.isspace() for c in t):
            seen.add(t)
            out.append(t)
    return out


def write_vocab(tokens: list[str], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return path


class WordPieceTokenizer:
    """WordPiece from ``vocab_file`` (one token per line, id = line number).

    Args:
        vocab_file: the vocab (e.g. bert-base-cased's vocab.txt, or the synthetic corpus's).
        lowercase: lower-case and strip accents first (uncased vocabs); None guesses from the vocab (cased when
            any token has an upper-case letter).
        name: recorded as ``tokenizer`` in txt_db meta.json (default: the vocab file's folder/stem).
    """

    def __init__(self, vocab_file: str | os.PathLike, lowercase: bool | None = None, name: str | None = None):
        self.vocab_file = Path(vocab_file)
        if not self.vocab_file.is_file():
            raise FileNotFoundError(f"WordPieceTokenizer: vocab_file {str(self.vocab_file)!r} does not exist")
        lines = self.vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab: dict[str, int] = {}
        for i, tok in enumerate(lines):
            tok = tok.strip()
            if tok and tok not in self.vocab:
                self.vocab[tok] = i
        self.size = len(lines)
        missing = [t for t in ("[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in self.vocab]
        if missing:
            raise ValueError(f"WordPieceTokenizer: vocab_file {str(self.vocab_file)!r} lacks special tokens {missing}")
        if lowercase is None:
            lowercase = not any(any(c.isupper() for c in t) for t in self.vocab if not t.startswith("["))
        self.lowercase = lowercase
        self.name = name or f"{self.vocab_file.parent.name}/{self.vocab_file.stem}"
        tok = Tokenizer(models.WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=lowercase, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        self._tok = tok
        self._id2tok = {i: t for t, i in self.vocab.items()}

    # ids of the special tokens
    @property
    def pad_id(self) -> int:
        return self.vocab.get("[PAD]", 0)

    @property
    def unk_id(self) -> int:
        return self.vocab["[UNK]"]

    @property
    def cls_id(self) -> int:
        return self.vocab["[CLS]"]

    @property
    def sep_id(self) -> int:
        return self.vocab["[SEP]"]

    @property
    def mask_id(self) -> int:
        return self.vocab["[MASK]"]

    @property
    def vocab_size(self) -> int:
        return self.size

    @property
    def v_range(self) -> tuple[int, int]:
        """Ids drawn for MLM's random replacement: from '!' (the first real piece in BERT vocabs) to the end."""
        if "!" in self.vocab:
            return self.vocab["!"], self.size
        first = next(i for t, i in sorted(self.vocab.items(), key=lambda x: x[1])
                     if i > self.mask_id and not t.startswith("["))
        return first, self.size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_token(self, i: int) -> str:
        return self._id2tok.get(int(i), "[UNK]")

    def token_to_id(self, token: str) -> int:
        return self.vocab.get(token, self.unk_id)

    def meta(self) -> dict:
        """The txt_db meta.json entries this tokenizer defines."""
        return {"UNK": self.unk_id, "CLS": self.cls_id, "SEP": self.sep_id, "MASK": self.mask_id,
                "v_range": list(self.v_range), "tokenizer": self.name, "vocab_size": self.vocab_size,
                "lowercase": self.lowercase}
