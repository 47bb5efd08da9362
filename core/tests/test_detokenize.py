"""The decode loop's incremental detokenizing gives, token by token, what decoding every token
gives: multi-byte characters split over tokens, special tokens skipped, stop sequences found
wherever they fall, on a byte-level tokenizer and a SentencePiece-style one."""

from __future__ import annotations

import random

import pytest

from gptstore.serving.decoding import Decoder, Row, generator
from gptstore.testing.models import tokenizer as byte_level
from gptstore.types import GenerationRequest

TEXTS = [
    "def f(x):\n    return x ** 2  # the square\n",
    "Ünïcödé: naïve café, 東京タワー, emoji 🙂🚀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters.",
    "  leading spaces, trailing spaces  \n\n\ttabs\t and  double  spaces ",
    "<|im_start|>special tokens<|im_end|> inside <|endoftext|>the text",
    "<s> starts, </s> ends, and <s>  <s> again",
]


def metaspace():
    """A SentencePiece-style tokenizer (Metaspace, byte fallback), as Llama 2 and Mistral have:
    a decode drops the space that starts its text, and characters outside the vocabulary are
    byte tokens."""
    import json
    import pydoc_data.topics

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    def configured(tokenizer):
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tokenizer.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(content=" ", left=1, right=0),
            ]
        )
        return tokenizer

    trained = configured(Tokenizer(models.BPE(unk_token="<unk>")))
    trained.train_from_iterator(
        list(pydoc_data.topics.topics.values())[:200],
        trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>"], show_progress=False),
    )
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = configured(
        Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def decoder(request):
    tokenizer = byte_level() if request.param == "byte-level" else metaspace()
    return Decoder(tokenizer, None, 0)


def feed(decoder, tokens, stop=()):
    """The row's text after each token, as the loop builds it."""
    request = GenerationRequest(prompt="x", max_tokens=len(tokens) + 1, stop=stop)
    row = Row(request, 1, generator(None))
    texts = []
    for token in tokens:
        decoder.advance(row, token, None)
        texts.append(row.text)
        if row.finish is not None:
            break
    return row, texts


def test_each_step_gives_what_decoding_every_token_gives(decoder):
    tokenizer = decoder.tokenizer
    rng = random.Random(0)
    sequences = [tokenizer(t)["input_ids"] for t in TEXTS]
    # and random ids, which split characters and put special tokens anywhere
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(80)] for _ in range(20)]
    for tokens in sequences:
        tokens = [t for t in tokens if t not in decoder.eos_ids]
        _row, texts = feed(decoder, tokens)
        for n, text in enumerate(texts, start=1):
            assert text == tokenizer.decode(tokens[:n], skip_special_tokens=True), (tokens, n)


def test_a_stop_sequence_is_found_where_it_falls(decoder):
    tokens = decoder.tokenizer(TEXTS[1])["input_ids"]
    full = decoder.tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in ("na", "café", "🚀", "ers."):
        row, _texts = feed(decoder, tokens, stop=(stop,))
        assert (row.finish, row.text) == ("stop", full[: full.index(stop)])
