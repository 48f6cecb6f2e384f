"""vbert.structured: validation of the request's choice, and the bitmask unpacking against llguidance's own."""
from __future__ import annotations

import pytest
import torch

from vbert.structured import MAX_CHOICES, StructuredOutput, allowed_tokens, compiler_for

pytest.importorskip("llguidance")


@pytest.mark.parametrize("kind, value, fragment", [
    ("xml", "x", "kind must be one of"), ("json", "{not json", "not valid JSON"), ("json", "[1]", "JSON object"),
    ("json", 5, "expected a JSON Schema"), ("regex", "", "non-empty string"), ("grammar", None, "non-empty string"),
    ("choice", "yes", "non-empty list"), ("choice", (), "non-empty list"), ("choice", ("a", ""), "non-empty"),
    ("choice", tuple(str(i) for i in range(MAX_CHOICES + 1)), "non-empty strings"),
    ("regex", "a" * 70000, "at most"),
])
def test_bad_choices_name_the_problem(kind, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        StructuredOutput(kind, value)


def test_a_dict_schema_keeps_its_property_order_and_json_object_ignores_its_value():
    s = StructuredOutput("json", {"type": "object", "properties": {"z": {}, "a": {}}})
    assert s.value.index('"z"') < s.value.index('"a"')
    assert StructuredOutput("json_object", "anything").value == ""


def test_allowed_tokens_unpack_llguidance_bitmasks():
    """allowed_tokens' numpy unpacking agrees with llguidance's own byte mask (compute_logit_bias: 200 = allowed)
    for a grammar in three states (the tiny decoders' byte-level BPE), and a row without a matcher allows all."""
    from tests.decoder_models import tiny_tokenizer

    tok = tiny_tokenizer()
    vocab = len(tok)
    compiler = compiler_for(tok, vocab, [tok.eos_token_id])
    for text in ("", "a", "ab1"):
        m = compiler.matcher(StructuredOutput("regex", "ab[0-9]+"))
        assert all(m.consume(t) for t in tok.encode(text, add_special_tokens=False))
        mask = allowed_tokens([m, None], vocab)
        expected = torch.tensor(list(m._m.compute_logit_bias()), dtype=torch.uint8)[:vocab] == 200
        assert torch.equal(mask[0], expected) and bool(mask[1].all())
        assert 0 < int(mask[0].sum()) < vocab
    assert m.is_done is False and m.consume(tok.eos_token_id)
    with pytest.raises(ValueError, match="structured output regex"):
        compiler.check(StructuredOutput("regex", "(unclosed"))


@pytest.mark.parametrize("choice", ["café", 'say "hi"', "two\nlines", "back\\slash", "日本"])
def test_a_choice_matches_exactly_its_string_whatever_its_characters(choice):
    """Choices become Lark string literals: quotes, backslashes, newlines and non-ASCII text match themselves, and
    the grammar is complete right after (a prefix is not)."""
    from tests.decoder_models import tiny_tokenizer

    tok = tiny_tokenizer()
    compiler = compiler_for(tok, len(tok), [tok.eos_token_id])
    m = compiler.matcher(StructuredOutput("choice", (choice, "other")))
    ids = tok.encode(choice, add_special_tokens=False)
    assert all(m.consume(t) for t in ids) and m.is_done
    m = compiler.matcher(StructuredOutput("choice", (choice + "!", "other")))
    assert all(m.consume(t) for t in ids) and not m.is_done
