"""Phi-2's tokenizer (CodeGen: GPT-2 byte-level BPE + 38 whitespace tokens, 50295 ids) via ``tokenizers``.

Where it comes from, first match wins: the ``name_or_path`` argument, the ``SCRATCHLM_TOKENIZER`` variable,
the hub id ``microsoft/phi-2``. A local folder must hold ``tokenizer.json``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

from .errors import UserError

ENV_VAR = "SCRATCHLM_TOKENIZER"
DEFAULT_HUB_ID = "microsoft/phi-2"
EOT = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


class TokenizerNotFound(UserError, RuntimeError):
    """No tokenizer could be loaded; the message says where we looked and how to point at one."""


class Tokenizer:
    """Encode/decode with Phi-2's tokenizer. Batch methods use the Rust library's own thread pool."""

    def __init__(self, backend: _HFTokenizer, source: str, folder: Path | None = None) -> None:
        self.backend = backend
        self.source = source
        self.folder = folder
        eot = backend.token_to_id(EOT)
        if eot is None:
            raise TokenizerNotFound(f"tokenizer from {source} has no {EOT} token; it is not Phi-2's")
        self.eot_id: int = eot

    @functools.cached_property
    def digest(self) -> str:
        """A short hash of the whole tokenizer definition (parts that must tokenize alike compare it)."""
        return hashlib.blake2b(self.backend.to_str().encode(), digest_size=12).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """Documents tokenized in one batch and joined, each followed by <|endoftext|> (int64)."""
        return self.encode_documents_with_lengths(texts)[0]

    def encode_documents_with_lengths(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``encode_documents`` and each document's length in it (its <|endoftext|> included)."""
        ids = self.encode_batch(texts)
        lengths = np.array([len(d) + 1 for d in ids], dtype=np.int64)
        tokens = np.fromiter((t for doc in ids for t in (*doc, self.eot_id)), dtype=np.int64,
                             count=int(lengths.sum()))
        return tokens, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return self.backend.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)

    @functools.cached_property
    def _ids_of_pieces(self) -> dict[str, int | None]:
        """Each token's text as it decodes alone, to its id; None where several ids decode to the same text
        (bytes of a character split across tokens decode to U+FFFD, say)."""
        pieces: dict[str, int | None] = {}
        for i, piece in enumerate(self.decode_batch([[i] for i in range(self.vocab_size)])):
            pieces[piece] = None if piece in pieces else i
        return pieces

    def id_of_piece(self, piece: str) -> int | None:
        """The one token id whose text is ``piece`` (a server's token string, as OpenAI's, TGI's and
        llama.cpp's key their log-probabilities), or None: no token, or several, decode to it."""
        return self._ids_of_pieces.get(piece)

    def save(self, out_dir: str | Path) -> None:
        """Copy the tokenizer files beside a saved model, so ``AutoTokenizer`` finds them there."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.folder is None:
            self.backend.save(str(out_dir / "tokenizer.json"))
            return
        for name in TOKENIZER_FILES:
            if (self.folder / name).exists():
                shutil.copyfile(self.folder / name, out_dir / name)


def _from_folder(folder: Path, source: str) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TokenizerNotFound(f"{source}: no tokenizer.json in {folder}")
    return Tokenizer(_HFTokenizer.from_file(str(path)), source, folder)


def load_tokenizer(name_or_path: str | None = None) -> Tokenizer:
    """Phi-2's tokenizer from a folder or hub id; see the module docstring for the search order."""
    spec = name_or_path or os.environ.get(ENV_VAR) or DEFAULT_HUB_ID
    source = "argument" if name_or_path else (ENV_VAR if os.environ.get(ENV_VAR) else "default hub id")
    local = Path(spec).expanduser()
    if local.is_dir():
        return _from_folder(local, f"{source} {spec}")
    if local.is_file() and local.name.endswith(".json"):
        return Tokenizer(_HFTokenizer.from_file(str(local)), f"{source} {spec}", local.parent)
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec, allow_patterns=list(TOKENIZER_FILES)))
        return _from_folder(folder, f"hub {spec}")
    except TokenizerNotFound:
        raise
    except Exception as err:
        raise TokenizerNotFound(
            f"could not load a tokenizer from '{spec}' ({source}): not a local folder, and fetching it from "
            f"the Hugging Face hub failed ({type(err).__name__}). Set {ENV_VAR} to a folder holding Phi-2's "
            f"tokenizer.json, or make the hub id '{DEFAULT_HUB_ID}' reachable."
        ) from None
