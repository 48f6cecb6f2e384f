"""Readers, label maps, dev split and token/word alignment of training/data.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data import (ClassificationExample, DataError, NerExample, check_labels, encode_classification,
                           encode_ner, label_list, ner_label_list, read_classification, read_conll, split_dev,
                           word_level)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    import vbert.config

    return AutoTokenizer.from_pretrained(vbert.config.default_backbone_path(), local_files_only=True)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*records) -> str:
    return "".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in records)


# --- classification reader ------------------------------------------------------------------------


def test_read_classification_good_file(tmp_path):
    path = write(tmp_path, "train.jsonl", jsonl(
        {"text": "Aspirin works.", "label": "result", "metadata": {"x": 1}},
        "",
        {"label": "method", "text": "We follow Smith."},
        {"text": "Line with\nescaped newline", "label": 3},
    ))
    examples = read_classification(path)
    assert examples == [
        ClassificationExample("Aspirin works.", "result", 1),
        ClassificationExample("We follow Smith.", "method", 3),
        ClassificationExample("Line with\nescaped newline", "3", 4),  # int label -> str
    ]


def test_read_classification_no_trailing_newline_and_crlf(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"text": "a", "label": "x"}\r\n{"text": "b", "label": "y"}')
    assert [(e.text, e.label, e.line) for e in read_classification(path)] == [("a", "x", 1), ("b", "y", 2)]


def test_read_classification_malformed_json_names_line_3(tmp_path):
    path = write(tmp_path, "train.jsonl", jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "y"},
                                                '{"text": "c", "label": '))
    with pytest.raises(DataError, match=r"train\.jsonl line 3: malformed JSON"):
        read_classification(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_read_classification_empty_file(tmp_path, text):
    path = write(tmp_path, "empty.jsonl", text)
    with pytest.raises(DataError, match=r"empty\.jsonl: no examples"):
        read_classification(path)


@pytest.mark.parametrize("record, message", [
    ({"text": "a"}, 'line 2: missing "label"'),
    ({"text": "a", "label": ""}, 'line 2: empty "label"'),
    ({"text": "a", "label": 1.5}, 'line 2: "label" must be a string or an integer'),
    ({"text": "a", "label": True}, 'line 2: "label" must be a string or an integer'),
    ({"label": "x"}, 'line 2: missing "text"'),
    ({"text": "   ", "label": "x"}, 'line 2: empty "text"'),
    ({"text": 5, "label": "x"}, 'line 2: "text" must be a string'),
    (["text", "label"], "line 2: expected a JSON object"),
])
def test_read_classification_bad_record_names_line(tmp_path, record, message):
    path = write(tmp_path, "d.jsonl", jsonl({"text": "ok", "label": "x"}, record))
    with pytest.raises(DataError) as info:
        read_classification(path)
    assert f"d.jsonl {message}" in str(info.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: cannot read"):
        read_classification(tmp_path / "nope.jsonl")


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"The\tO\nb\xffad\tO\n")
    with pytest.raises(DataError, match=r"bad\.txt line 2: not valid UTF-8"):
        read_conll(path)


# --- CoNLL reader ---------------------------------------------------------------------------------

CONLL = """\
-DOCSTART-\tO

Identification\tNN\tO\tO
of\tIN\tO\tO
APC2\tNN\tO\tB-Gene

adenomatous\tJJ\tO\tB-Disease
polyposis  NN  O  I-Disease
coli\tNN\tO\tI-Disease


-DOCSTART- -X- -X- O

Last\tO
one\tB-Disease"""  # the last sentence has no trailing blank line


def test_read_conll_good_file_docstart_and_last_sentence(tmp_path):
    examples = read_conll(write(tmp_path, "train.txt", CONLL))
    assert examples == [
        NerExample(("Identification", "of", "APC2"), ("O", "O", "B-Gene"), 3),
        NerExample(("adenomatous", "polyposis", "coli"), ("B-Disease", "I-Disease", "I-Disease"), 7),
        NerExample(("Last", "one"), ("O", "B-Disease"), 14),
    ]
    assert ner_label_list(examples) == ("B-Disease", "B-Gene", "I-Disease", "O")


def test_read_conll_docstart_without_blank_line_ends_sentence(tmp_path):
    examples = read_conll(write(tmp_path, "t.txt", "a\tO\n-DOCSTART-\tO\nb\tB-X\n"))
    assert [(e.words, e.line) for e in examples] == [(("a",), 1), (("b",), 3)]


@pytest.mark.parametrize("text", ["", "\n\n", "-DOCSTART-\tO\n\n"])
def test_read_conll_empty_file(tmp_path, text):
    with pytest.raises(DataError, match=r"t\.txt: no examples"):
        read_conll(write(tmp_path, "t.txt", text))


def test_read_conll_single_column_names_line(tmp_path):
    with pytest.raises(DataError, match=r"t\.txt line 4: expected a word and a tag.*'lonely'"):
        read_conll(write(tmp_path, "t.txt", "a\tO\nb\tO\n\nlonely\n"))


@pytest.mark.parametrize("tag", ["X-Disease", "B-", "b-Disease", "Disease", "I_Disease"])
def test_read_conll_bad_tag_names_line(tmp_path, tag):
    with pytest.raises(DataError, match=rf"t\.txt line 2: tag '{tag}' is not O, B-<type> or I-<type>"):
        read_conll(write(tmp_path, "t.txt", f"a\tO\nb\t{tag}\n"))


# --- labels ---------------------------------------------------------------------------------------


def test_label_list_sorted_unique():
    assert label_list(["result", "background", "method", "background"]) == ("background", "method", "result")
    assert label_list([ClassificationExample("t", "b", 1), ClassificationExample("t", "a", 2)]) == ("a", "b")


def test_check_labels_accepts_known():
    check_labels([ClassificationExample("t", "a", 1)], ("a", "b"), "test.txt")
    check_labels([NerExample(("x", "y"), ("O", "B-X"), 1)], ("B-X", "O"), "test.txt")
    check_labels(["a", "b"], ("a", "b"), "test.txt")


def test_check_labels_names_unknown_label_and_line():
    examples = [ClassificationExample("t", "a", 3), ClassificationExample("t", "X", 12),
                ClassificationExample("t", "X", 13)]
    with pytest.raises(DataError) as info:
        check_labels(examples, ("a", "b"), "test.txt")
    assert str(info.value) == "unknown label 'X' in test.txt line 12 (known: a, b)"


def test_check_labels_ner_tag_line_and_several_unknown():
    examples = [NerExample(("w1", "w2", "w3"), ("O", "O", "B-Chem"), 5),
                NerExample(("w4",), ("I-Gene",), 9)]
    with pytest.raises(DataError) as info:
        check_labels(examples, ("B-Disease", "I-Disease", "O"), "dev.txt")
    message = str(info.value)
    assert message.startswith("unknown labels 'B-Chem' in dev.txt line 7, 'I-Gene' in dev.txt line 9")
    assert "(known: B-Disease, I-Disease, O)" in message


def test_check_labels_plain_strings_name_the_file():
    with pytest.raises(DataError, match=r"unknown label 'z' in test.txt \(known: a\)"):
        check_labels(["a", "z"], ("a",), "test.txt")


# --- dev split ------------------------------------------------------------------------------------


def test_split_dev_deterministic_disjoint_ordered():
    examples = list(range(100))
    train, dev = split_dev(examples, fraction=0.1, seed=7)
    assert (train, dev) == split_dev(examples, fraction=0.1, seed=7)
    assert len(dev) == 10 and len(train) == 90
    assert sorted(train + dev) == examples
    assert train == sorted(train) and dev == sorted(dev)  # input order kept
    assert split_dev(examples, fraction=0.1, seed=8)[1] != dev


def test_split_dev_small_inputs():
    assert split_dev([1, 2], fraction=0.1) in (([1], [2]), ([2], [1]))
    train, dev = split_dev([1, 2, 3], fraction=0.9)
    assert len(train) == 1 and len(dev) == 2
    assert split_dev([1]) == ([1], [])
    assert split_dev([]) == ([], [])
    with pytest.raises(ValueError):
        split_dev([1, 2], fraction=0.0)
    with pytest.raises(ValueError):
        split_dev([1, 2], fraction=1.0)


# --- encoding -------------------------------------------------------------------------------------


def test_encode_classification(tokenizer):
    examples = [ClassificationExample("Aspirin reduces the risk.", "result", 1),
                ClassificationExample("word " * 50, "method", 2)]
    encoded = encode_classification(tokenizer, examples, {"method": 0, "result": 1}, max_length=16)
    assert [e["label"] for e in encoded] == [1, 0]
    assert encoded[0]["input_ids"] == tokenizer("Aspirin reduces the risk.")["input_ids"]
    assert encoded[0]["input_ids"][0] == tokenizer.cls_token_id
    assert len(encoded[1]["input_ids"]) == 16 and encoded[1]["input_ids"][-1] == tokenizer.sep_token_id
    with pytest.raises(DataError, match="line 2: unknown label 'method'"):
        encode_classification(tokenizer, examples, {"result": 0}, max_length=16)


def test_encode_ner_alignment(tokenizer):
    words = ("Familial", "adenomatous", "polyposis", "is", "rare", ".")
    tags = ("O", "B-Disease", "I-Disease", "O", "O", "O")
    tag_ids = {"B-Disease": 0, "I-Disease": 1, "O": 2}
    (enc,) = encode_ner(tokenizer, [NerExample(words, tags, 1)], tag_ids, max_length=64)
    ids, labels, word_ids = enc["input_ids"], enc["labels"], enc["word_ids"]
    assert len(ids) == len(labels) == len(word_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert word_ids[0] is None and word_ids[-1] is None
    assert labels[0] == -100 and labels[-1] == -100
    # word_ids cover every word, in order, each on a contiguous run of tokens
    inner = word_ids[1:-1]
    assert inner == sorted(inner) and set(inner) == set(range(len(words)))
    # "adenomatous" splits into several sub-tokens: its tag on the first only
    positions = [i for i, w in enumerate(word_ids) if w == 1]
    assert len(positions) > 1
    assert labels[positions[0]] == tag_ids["B-Disease"]
    assert all(labels[i] == -100 for i in positions[1:])
    assert "".join(t.removeprefix("##") for t in (tokens[i] for i in positions)) == "adenomatous"
    # every word: first sub-token carries its tag, the rest -100
    for w, tag in enumerate(tags):
        first = word_ids.index(w)
        assert labels[first] == tag_ids[tag]
    assert sum(label != -100 for label in labels) == len(words)


def test_encode_ner_truncation_and_word_level(tokenizer):
    words = tuple(f"polyposis{i}" for i in range(10))
    tags = ("B-Disease",) + ("O",) * 9
    (enc,) = encode_ner(tokenizer, [NerExample(words, tags, 1)], {"B-Disease": 0, "O": 1}, max_length=8)
    assert len(enc["input_ids"]) == 8 and enc["word_ids"][-1] is None
    kept = {w for w in enc["word_ids"] if w is not None}
    assert kept and max(kept) < len(words) - 1  # later words are cut off
    token_labels = ["B-Disease" if label == 0 else "X" for label in enc["labels"]]
    predicted = word_level(token_labels, enc["word_ids"], len(words))
    assert predicted[0] == "B-Disease"
    assert predicted[max(kept) + 1:] == ["O"] * (len(words) - max(kept) - 1)


def test_encode_ner_unknown_tag_names_its_line(tokenizer):
    example = NerExample(("a", "b", "c"), ("O", "O", "B-Chem"), 10)
    with pytest.raises(DataError, match="line 12: unknown label 'B-Chem'"):
        encode_ner(tokenizer, [example], {"O": 0}, max_length=16)


def test_word_level_first_subtoken_wins():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    token_labels = ["PAD", "B-X", "I-X", "O", "B-Y", "O", "O", "PAD"]
    assert word_level(token_labels, word_ids, 3) == ["B-X", "O", "B-Y"]
    assert word_level(token_labels + ["extra"] * 4, word_ids, 5) == ["B-X", "O", "B-Y", "O", "O"]
    with pytest.raises(ValueError):
        word_level(token_labels[:3], word_ids, 3)
    with pytest.raises(ValueError):
        word_level(token_labels, word_ids, 2)


# --- the real shared data (read a few lines only; skipped where absent) -------------------------------


def test_real_shared_data_heads(tmp_path, tokenizer):
    cls_file = SHARED_DATA / "cls" / "sci-cite" / "train.txt"
    ner_file = SHARED_DATA / "ner" / "NCBI-disease" / "train.txt"
    if not (cls_file.is_file() and ner_file.is_file()):
        pytest.skip(f"shared data not found under {SHARED_DATA}")
    with cls_file.open(encoding="utf-8") as f:
        head = "".join(next(f) for _ in range(50))
    examples = read_classification(write(tmp_path, "sci-cite-head.txt", head))
    assert len(examples) == 50
    assert set(label_list(examples)) <= {"background", "method", "result"}
    label_ids = {label: i for i, label in enumerate(label_list(examples))}
    encoded = encode_classification(tokenizer, examples, label_ids, 128)
    assert all(2 < len(e["input_ids"]) <= 128 for e in encoded)

    lines = []
    with ner_file.open(encoding="utf-8") as f:
        for line in f:
            lines.append(line)
            if sum(1 for text in lines if not text.strip()) == 2:
                break
    sentences = read_conll(write(tmp_path, "ncbi-head.txt", "".join(lines)))
    assert len(sentences) == 2 and sentences[0].line == 1
    assert set(ner_label_list(sentences)) <= {"B-Disease", "I-Disease", "O"}
    assert any(t != "O" for s in sentences for t in s.tags)
    tags = ner_label_list(sentences)
    encoded = encode_ner(tokenizer, sentences, {t: i for i, t in enumerate(tags)}, max_length=128)
    for s, e in zip(sentences, encoded):
        assert sum(label != -100 for label in e["labels"]) == len(s.words)
