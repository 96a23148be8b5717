"""WordPiece from a vocab file in the bert-base-cased layout (no download)."""

import pytest

from fastvl.data import WordPieceTokenizer
from fastvl.data.synthetic import synthetic_vocab
from fastvl.data.tokenizer import SPECIAL_IDS, bert_layout_vocab, write_vocab


@pytest.fixture
def vocab_file(tmp_path):
    return write_vocab(synthetic_vocab(), tmp_path / "vocab.txt")


def test_bert_layout_special_ids(vocab_file):
    tok = WordPieceTokenizer(vocab_file)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert {t: tok.token_to_id(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    assert tok.id_to_token(5) == "[unused5]"
    assert tok.v_range == (tok.token_to_id("!"), tok.vocab_size) and tok.v_range[0] > 103
    meta = tok.meta()
    assert (meta["CLS"], meta["SEP"], meta["MASK"], meta["UNK"]) == (101, 102, 103, 100)


def test_wordpiece_splits_words_and_punctuation(vocab_file):
    tok = WordPieceTokenizer(vocab_file)
    assert not tok.lowercase  # the vocab has upper-case pieces: cased
    assert tok.tokenize("a red cup, left of the box.") == ["a", "red", "cup", ",", "left", "of", "the", "box", "."]
    # an unknown word falls back to letter pieces, never [UNK], and case is kept
    assert tok.tokenize("Zebra") == ["Z", "##e", "##b", "##r", "##a"]
    ids = tok.encode("a small blue lamp in the center .")
    assert 101 not in ids and 102 not in ids  # no [CLS]/[SEP]: the txt_db stores bare ids
    assert tok.decode(ids) == "a small blue lamp in the center."
    assert tok.encode("  ") == []
    assert tok.tokenize("é") == ["[UNK]"]


def test_uncased_vocab_lowercases(tmp_path):
    vocab = write_vocab(bert_layout_vocab(["!", "red", "cup", "re", "##d"]), tmp_path / "v.txt")
    tok = WordPieceTokenizer(vocab)
    assert tok.lowercase
    assert tok.tokenize("RED Cup") == ["red", "cup"]
    cased = WordPieceTokenizer(vocab, lowercase=False)
    assert cased.tokenize("RED") == ["[UNK]"]


def test_bad_vocab_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab_file"):
        WordPieceTokenizer(tmp_path / "none.txt")
    (tmp_path / "v.txt").write_text("[PAD]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks special tokens \['\[UNK\]'"):
        WordPieceTokenizer(tmp_path / "v.txt")
