"""Tag: character offsets of tokens and entities in the caller's text (issue 18 item 4), over real
gRPC on loopback, and the aggregation of word pieces (Hugging Face's aggregation_strategy="first")."""
from __future__ import annotations

import re

import pytest
import torch

from dispatcher import convert
from dispatcher.gen.vbert.v1 import tenant_pb2
from tests.conftest import make_artifact
from tests.dispatcher.conftest import bearer
from vbert import HeadKind, HeadSpec
from vbert.heads import Head
from vbert.model import RowOutput
from vbert.tokens import tokenize_bounded, tokenize_bounded_spans

T = tenant_pb2
NER = ("B-X", "I-X", "O")
WORDS = re.compile(r"\w+|[^\w\s]")      # BERT's pre-tokenized words for these texts


def always(label: str, shape) -> object:
    """A tag adapter that predicts `label` for every token: zero weights, a bias for that label."""
    art = make_artifact(shape, "bottleneck", HeadSpec(HeadKind.TAG, NER), 7, size=4)
    bias = torch.full((len(NER),), -5.0)
    bias[NER.index(label)] = 5.0
    art.head = Head(art.head.spec, weight=torch.zeros_like(art.head.weight), bias=bias)
    return art


@pytest.fixture(scope="module")
def keys(server):
    """Two tenants with the same adapters: "offsets" (default quotas) and "short" (8 tokens per input)."""
    shape = server.app.model.spec.shape
    keys = {"offsets": server.register("offsets"), "short": server.register("short", max_tokens_per_request=8)}
    for tenant in keys:
        server.app.manager.upload_adapter(tenant, "all-b", always("B-X", shape))
        server.app.manager.upload_adapter(tenant, "all-i", always("I-X", shape))
    return keys


@pytest.fixture(scope="module")
def key(keys):
    return keys["offsets"]


def tag(server, key, adapter, *inputs, truncation=T.TRUNCATE):
    items = [T.Input(text=x) if isinstance(x, str) else T.Input(token_ids=T.TokenIds(ids=x)) for x in inputs]
    return server.tenant.Tag(T.TagRequest(adapter=adapter, inputs=items, truncation=truncation),
                             metadata=bearer(key), timeout=30).results


def check_tokens(text, result):
    """Special tokens have -1; the others, in order, a non-empty span of the text."""
    last = 0
    for t in result.tokens:
        if t.token in ("[CLS]", "[SEP]"):
            assert (t.start_char, t.end_char) == (-1, -1)
            continue
        assert last <= t.start_char < t.end_char <= len(text), t
        assert text[t.start_char:t.end_char].strip() == text[t.start_char:t.end_char]
        last = t.end_char


SHORT = ["Müller's café", "  café, Müller!  ", "the café and the café", "(a) gene;\tthe\ncell."]


def test_every_word_an_entity_at_its_own_offsets(server, key):
    results = tag(server, key, "all-b", *SHORT)
    for text, res in zip(SHORT, results):
        check_tokens(text, res)
        words = [(m.start(), m.end()) for m in WORDS.finditer(text)]
        assert [(e.start_char, e.end_char) for e in res.entities] == words
        assert [e.text for e in res.entities] == [text[a:b] for a, b in words]     # case and accents kept
        for e in res.entities:
            assert e.label == "X" and e.end_token > e.start_token
            assert e.start_char == res.tokens[e.start_token].start_char
            assert e.end_char == res.tokens[e.end_token - 1].end_char
    assert [e.text for e in results[0].entities] == ["Müller", "'", "s", "café"]
    repeated = [(e.text, e.start_char) for e in results[2].entities]
    assert repeated == [("the", 0), ("café", 4), ("and", 9), ("the", 13), ("café", 17)]


def test_one_entity_spans_the_text_without_its_outer_whitespace(server, key):
    for text, res in zip(SHORT, tag(server, key, "all-i", *SHORT)):
        (e,) = res.entities
        assert e.text == text.strip() and (e.start_char, e.end_char) == (len(text) - len(text.lstrip()),
                                                                          len(text.rstrip()))
        assert (e.start_token, e.end_token) == (1, len(res.tokens) - 1)


@pytest.mark.parametrize("num_words", [3, 60])       # cut after tokenizing it all / decided by its prefix
def test_a_truncated_text_has_offsets_for_its_kept_tokens(server, keys, num_words):
    key = keys["short"]
    text = " ".join(["the", "café", "gene"] * num_words)
    (res,) = tag(server, key, "all-b", text)
    assert len(res.tokens) == 8 and res.tokens[-1].token == "[SEP]"
    check_tokens(text, res)
    words = [(m.start(), m.end()) for m in WORDS.finditer(text)][:6]
    assert [(e.start_char, e.end_char) for e in res.entities] == words
    (whole,) = tag(server, key, "all-i", text)
    assert whole.entities[0].text == "the café gene the café gene"


def test_token_ids_have_no_offsets(server, key):
    tok = server.app.model.tokenizer
    ids = tok("the café gene")["input_ids"]
    text_res, ids_res = tag(server, key, "all-b", "the café gene", ids)
    assert [t.token for t in ids_res.tokens] == [t.token for t in text_res.tokens]
    assert all((t.start_char, t.end_char) == (-1, -1) for t in ids_res.tokens)
    assert [(e.start_token, e.end_token) for e in ids_res.entities] == \
           [(e.start_token, e.end_token) for e in text_res.entities]
    assert all((e.start_char, e.end_char) == (-1, -1) for e in ids_res.entities)
    assert [e.text for e in ids_res.entities] == ["the", "[UNK]", "gene"]    # the tokens: nothing to cut from


# -- the real default backbone's tokenizer -------------------------------------------------------
@pytest.fixture(scope="module")
def real_tok(default_checkpoint):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_checkpoint), local_files_only=True)


REAL = ["Müller's café serves crème brûlée", "  Photosynthesis, naïvely: BRCA1-related carcinogenesis!  ",
        "the the the", "Überprüfung\tof 42% co. (x) state-of-the-art"]


def test_offsets_round_trip_with_the_real_tokenizer(real_tok):
    normalize = real_tok.backend_tokenizer.normalizer.normalize_str
    rows = tokenize_bounded_spans(real_tok, REAL, [512] * len(REAL), [True] * len(REAL))
    for text, row in zip(REAL, rows):
        tokens = real_tok.convert_ids_to_tokens(row.ids)
        assert row.ids == real_tok(text)["input_ids"]
        ends = []
        for tok, (a, b), w in zip(tokens, row.offsets, row.word_ids):
            if w is None:
                assert tok in real_tok.all_special_tokens and (a, b) == (0, 0)
                continue
            assert 0 <= a < b <= len(text) and (not ends or a >= ends[-1])
            ends.append(b)
            piece = tok[2:] if tok.startswith("##") else tok
            assert tok == "[UNK]" or normalize(text[a:b]) == piece
        assert len(set(row.offsets[1:-1])) == len(row.offsets) - 2      # repeated words: distinct offsets


def test_truncated_offsets_are_a_prefix_of_the_whole_texts(real_tok):
    text = " ".join(REAL * 200)
    whole = real_tok(text, return_offsets_mapping=True)["offset_mapping"]
    for limit in (16, 128):
        (row,) = tokenize_bounded_spans(real_tok, [text], [limit], [True])
        assert len(row.ids) == limit and row.offsets[:-1] == [tuple(o) for o in whole[:limit - 1]]
        assert row.ids == tokenize_bounded(real_tok, [text], [limit], [True])[0]


def logits_for(labels):
    """Tag logits whose best label per token is the given one."""
    return torch.stack([torch.eye(len(NER))[NER.index(lab)] * 4 for lab in labels])


@pytest.mark.parametrize("continuation", ["O", "I-X", "B-X"])
def test_a_word_takes_its_first_pieces_label(real_tok, continuation):
    text = "  carcinogenesis in Müller"
    (row,) = tokenize_bounded_spans(real_tok, [text], [512], [True])
    tokens = real_tok.convert_ids_to_tokens(row.ids)
    assert sum(t.startswith("##") for t in tokens) >= 2                 # split into word pieces
    labels = ["O" if w is None else ("B-X" if not t.startswith("##") and t != "in" else
                                     "O" if t == "in" else continuation)
              for t, w in zip(tokens, row.word_ids)]
    out = RowOutput(HeadKind.TAG, NER, logits=logits_for(labels))
    res = convert.tagging(out, tokens, set(real_tok.all_special_tokens), text=text, offsets=row.offsets,
                          word_ids=row.word_ids)
    assert [(e.text, e.start_char, e.end_char) for e in res.entities] == [("carcinogenesis", 2, 16),
                                                                         ("Müller", 20, 26)]
    assert [t.label for t in res.tokens] == labels                      # tokens keep their own labels
    # token ids: the same words from the "##" pieces
    bare = convert.tagging(out, tokens, set(real_tok.all_special_tokens))
    assert [(e.start_token, e.end_token) for e in bare.entities] == \
           [(e.start_token, e.end_token) for e in res.entities]
    assert [e.text for e in bare.entities] == ["carcinogenesis", "muller"]
    assert all(e.start_char == -1 for e in bare.entities)


def test_an_i_piece_after_an_o_word_start_does_not_start_an_entity(real_tok):
    text = "carcinogenesis"
    (row,) = tokenize_bounded_spans(real_tok, [text], [512], [True])
    tokens = real_tok.convert_ids_to_tokens(row.ids)
    labels = ["O"] + ["O"] + ["I-X"] * (len(tokens) - 3) + ["O"]
    res = convert.tagging(RowOutput(HeadKind.TAG, NER, logits=logits_for(labels)), tokens, set(), text=text,
                          offsets=row.offsets, word_ids=row.word_ids)
    assert not res.entities
