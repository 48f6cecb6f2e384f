"""vbert.detokenize: streamed deltas join to the full decode, never a broken character; stop strings."""
from __future__ import annotations

import pytest

from vbert.detokenize import REPLACEMENT_CHAR, FinishReason, IncrementalDetokenizer, StopChecker, TextStream

TEXTS = [
    "Hello world, café déjà vu.",
    "日本語のテキスト and 日本 again",
    "emoji 🙂🚀 mixed with é and ü; naïve  double  spaces",
    "a",
    "Tokyo 東京 is in 日本. Crème brûlée! 👍🏽",
]
CORPUS = TEXTS + ["Hello world STOP more", "the quick brown fox jumps over the lazy dog"] * 3


def _byte_level_bpe():
    """A tiny GPT-2 style byte-level BPE: few merges, so multi-byte characters split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>")


def _metaspace_bpe():
    """A SentencePiece-like BPE: words carry a leading '▁' that the decoder turns into a space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _wordpiece(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "play", "##ing", "##ed", "un",
             "##believ", "##able", ",", ".", "!", "e", "##e", "caf", "日", "本", "##s", "stop", "more", "s",
             "##t", "##a", "##y"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"byte_level": _byte_level_bpe(), "metaspace": _metaspace_bpe(),
            "wordpiece": _wordpiece(tmp_path_factory.mktemp("wordpiece"))}


def _stream(tokenizer, ids, prompt_ids=None, skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


def _check_stream(tokenizer, ids, skip_special_tokens=True):
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    deltas = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == full
    if REPLACEMENT_CHAR not in full:
        assert not any(REPLACEMENT_CHAR in d for d in deltas), deltas
    return deltas


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "wordpiece"])
def test_joined_deltas_equal_full_decode(tokenizers, name):
    tok = tokenizers[name]
    for text in TEXTS:
        _check_stream(tok, tok.encode(text, add_special_tokens=False))


def test_byte_level_tokens_split_characters_and_wait_for_them(tokenizers):
    tok = tokenizers["byte_level"]
    ids = tok.encode("日本 🙂", add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tok.decode([t]) for t in ids)      # the test exercises split characters
    deltas = _check_stream(tok, ids)
    assert "" in deltas[:-1]                                          # held until the character completed
    assert "".join(deltas) == "日本 🙂"


def test_wordpiece_pieces_join_without_spaces(tokenizers):
    tok = tokenizers["wordpiece"]
    ids = tok.encode("hello playing unbelievable world , played", add_special_tokens=True)
    deltas = _check_stream(tok, ids)
    assert deltas == ["", "hello", " play", "ing", " un", "believ", "able", " world", ",", " play", "ed",
                      "", ""]


def test_special_tokens_skipped_or_kept(tokenizers):
    tok = tokenizers["byte_level"]
    ids = [tok.bos_token_id] + tok.encode("café 日本", add_special_tokens=False) + [tok.eos_token_id]
    assert "".join(_check_stream(tok, ids)) == "café 日本"
    assert "".join(_check_stream(tok, ids, skip_special_tokens=False)).startswith("<|im_start|>")


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "wordpiece"])
def test_prompt_as_context(tokenizers, name):
    """With prompt_ids the stream is the continuation: decode(prompt + generated) minus decode(prompt)."""
    tok = tokenizers[name]
    ids = tok.encode(TEXTS[0] + " " + TEXTS[4], add_special_tokens=False)
    for split in range(1, len(ids)):
        before = tok.decode(ids[:split], skip_special_tokens=True)
        after = tok.decode(ids, skip_special_tokens=True)
        if REPLACEMENT_CHAR in before or not after.startswith(before):
            continue                                                  # the prompt ends mid-character
        assert "".join(_stream(tok, ids[split:], prompt_ids=ids[:split])) == after[len(before):]


def test_invalid_bytes_are_flushed_as_decoded(tokenizers):
    tok = tokenizers["byte_level"]
    lone = tok.convert_tokens_to_ids("Ģ")                             # byte 0x80 alone: invalid UTF-8
    ids = tok.encode("ok ", add_special_tokens=False) + [lone]
    full = tok.decode(ids)
    assert full.endswith(REPLACEMENT_CHAR)
    assert "".join(_stream(tok, ids)) == full


@pytest.mark.slow
def test_real_smollm2_tokenizer():
    """SmolLM2's own byte-level BPE, read from the packaged GGUF file (about 4 s; skipped without it)."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    from vbert.decoder_checkpoint import packaged_gguf_path

    try:
        path = packaged_gguf_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    for text in TEXTS + ["<|im_start|>assistant\nBonjour à tous 😀<|im_end|>"]:
        _check_stream(tok, tok.encode(text, add_special_tokens=False))


# -- stop strings ---------------------------------------------------------------------------------------

def test_stop_string_is_not_streamed(tokenizers):
    tok = tokenizers["byte_level"]
    stream = TextStream(tok, stop_strings=["STOP"])
    out = []
    for t in tok.encode("Hello world STOP more", add_special_tokens=False):
        out.append(stream.add(t))
        assert "Hello world ".startswith("".join(out))                 # never a letter of STOP
        if stream.finish_reason is not None:
            break
    assert "".join(out) == "Hello world " == stream.text
    assert stream.finish_reason is FinishReason.STOP and stream.stop.matched == "STOP"
    assert stream.finish(FinishReason.LENGTH) == "" and stream.finish_reason is FinishReason.STOP
    with pytest.raises(ValueError, match="finished"):
        stream.add(0)


def test_stop_string_split_across_deltas_is_held_back():
    stop = StopChecker(["STOP"])
    assert stop.feed("Hello S") == "Hello "
    assert stop.feed("TO") == ""
    assert stop.feed("P more") == ""
    assert stop.is_stopped and stop.feed("later") == "" and stop.flush() == ""


def test_false_start_is_released():
    stop = StopChecker(["STOP"])
    assert stop.feed("I ST") == "I "
    assert stop.feed("ay") == "STay"
    assert stop.feed(" S") == " "
    assert stop.flush() == "S" and not stop.is_stopped


def test_several_stop_strings_earliest_wins():
    stop = StopChecker(["END", "\n\n", "xyz"])
    assert stop.feed("one\n") == "one"
    assert stop.feed("\nEND") == "" and stop.matched == "\n\n"
    stop = StopChecker(["abcd", "bc"])
    assert stop.feed("xab") == "x"
    assert stop.feed("ce") == "a" and stop.matched == "bc"
    stop = StopChecker(["abcd", "bc"])
    assert stop.feed("xab") == "x" and stop.feed("cd") == "" and stop.matched == "abcd"


def test_length_finish_releases_held_text(tokenizers):
    tok = tokenizers["byte_level"]
    stream = TextStream(tok, stop_strings=["STOP"])
    deltas = [stream.add(t) for t in tok.encode("the end ST", add_special_tokens=False)]
    assert "".join(deltas) == "the end " and stream.finish_reason is None
    assert stream.finish(FinishReason.LENGTH) == "ST"
    assert stream.text == "the end ST" and stream.finish_reason is FinishReason.LENGTH


def test_cancelled_streams_nothing_more(tokenizers):
    tok = tokenizers["byte_level"]
    stream = TextStream(tok, stop_strings=["STOP"])
    for t in tok.encode("abc ST", add_special_tokens=False):
        stream.add(t)
    assert stream.finish(FinishReason.CANCELLED) == "" and stream.finish_reason is FinishReason.CANCELLED
    assert stream.text == "abc "


def test_no_stop_strings_passes_text_through(tokenizers):
    tok = tokenizers["metaspace"]
    stream = TextStream(tok)
    ids = tok.encode(TEXTS[2], add_special_tokens=False)
    text = "".join(stream.add(t) for t in ids) + stream.finish(FinishReason.LENGTH)
    assert text == tok.decode(ids)


def test_stop_checker_validation():
    with pytest.raises(ValueError, match="stop"):
        StopChecker("STOP")
    with pytest.raises(ValueError, match="stop"):
        StopChecker(["ok", ""])
    assert [r.value for r in FinishReason] == ["stop", "length", "cancelled"]


def test_unchecked_text_is_streamed_and_a_stop_string_counts_only_where_it_ends_after_it():
    """min_tokens: the text of the first tokens is fed with check=False. A stop string wholly inside it is streamed;
    one that starts in it and ends in checked text stops the stream; a shorter one inside the held-back unchecked
    characters does not count later."""
    stop = StopChecker(["ab"])
    assert stop.feed("xab", check=False) == "xab" and not stop.is_stopped
    assert stop.feed("yab") == "y" and stop.is_stopped and stop.matched == "ab"
    stop = StopChecker(["STOP"])
    assert stop.feed("go ST", check=False) == "go "           # held: may begin a stop string
    assert stop.feed("OP now") == "" and stop.is_stopped       # it ends in checked text: counts
    stop = StopChecker(["abc", "b"])
    assert stop.feed("xab", check=False) == "x"                # "ab" held (may begin "abc"), its "b" unchecked
    assert stop.feed("x") == "abx" and not stop.is_stopped     # "b" ended in unchecked text; "abc" did not come
    assert stop.feed("b") == "" and stop.matched == "b"        # a new "b" in checked text counts


def test_text_stream_passes_check_stop_through(tokenizers):
    tok = tokenizers["byte_level"]
    ids = tok.encode("one END two END three", add_special_tokens=False)
    stream = TextStream(tok, stop_strings=["END"])
    text = ""
    for i, t in enumerate(ids):
        text += stream.add(t, check_stop=i >= len(tok.encode("one END tw", add_special_tokens=False)))
        if stream.finish_reason is not None:
            break
    assert stream.finish_reason is FinishReason.STOP and text == "one END two "


def test_include_keeps_the_stop_string_that_ended_the_text():
    """vLLM's include_stop_str_in_output: the matched stop string ends the text (nothing after it), also when it
    came split across deltas."""
    stop = StopChecker(["END", "\n\n"], include=True)
    assert stop.feed("one E") == "one "
    assert stop.feed("ND two") == "END" and stop.is_stopped and stop.matched == "END"
    stop = StopChecker(["STOP"], include=True)
    assert stop.feed("a STOP b") == "a STOP" and stop.feed("more") == ""
