"""A thin wrapper over the Hugging Face ``tokenizers`` library.

It carries what a model needs around the raw encoder: BOS/EOS/pad ids, whether BOS is
prepended, and the chat template, read from ``tokenizer_config.json`` or GGUF metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from torch import nn

from evolm.errors import CheckpointError, ConfigError


@dataclass
class Tokenizer:
    """Text <-> token ids.

    Attributes:
        backend: The ``tokenizers.Tokenizer`` doing the work.
        bos_token_id: Beginning-of-sequence id, or None.
        eos_token_id: End-of-sequence id, or None.
        pad_token_id: Padding id, or None.
        add_bos: Prepend BOS in ``encode`` when the backend's post-processor does not already.
        chat_template: Jinja2 chat template, or None.
        source: Where it was loaded from.
    """

    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    source: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS as configured."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos
            and self.bos_token_id is not None
            and self.backend.post_processor is None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_tokens(self) -> dict[str, str | None]:
        """The ``bos_token`` / ``eos_token`` / ``pad_token`` strings, as chat templates expect them."""

        def tok(i: int | None) -> str | None:
            return self.backend.id_to_token(i) if i is not None else None

        return {
            "bos_token": tok(self.bos_token_id),
            "eos_token": tok(self.eos_token_id),
            "pad_token": tok(self.pad_token_id),
        }

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs,
    ) -> list[int] | str:
        """Render a conversation with the model's chat template (as transformers does).

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]``.
            add_generation_prompt: End with the header of the assistant's turn.
            tokenize: Return token ids (the template supplies special tokens, so none are added);
                False returns the text.
            **kwargs: Extra template variables (``tools``, ``enable_thinking``, ...).
        """
        from evolm.tokenizer.chat_template import render_chat

        if not self.chat_template:
            raise ConfigError(
                f"tokenizer {self.source} has no chat template; format the prompt yourself or use a chat model"
            )
        text = render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens(),
            **kwargs,
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental detokenizer: feed ids one at a time, get text that never splits a character."""
        return StreamDecoder(self, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self.backend.token_to_id(token)

    def check_model(self, model: nn.Module) -> None:
        """Raise if the tokenizer can produce ids the model has no embedding for."""
        cfg = getattr(model, "cfg", None)
        n = getattr(cfg, "vocab_size", None)
        if n is not None and self.vocab_size > n:
            raise CheckpointError(
                f"tokenizer {self.source} has {self.vocab_size} tokens but the model's vocab_size is {n}: "
                "ids >= the model's vocab would index past its embedding; use the tokenizer that belongs "
                "to this model"
            )


class StreamDecoder:
    """Incremental detokenization over ``tokenizers.decoders.DecodeStream``.

    ``step(id)`` returns the new text the id completes, or ``""`` while the bytes so far end in the
    middle of a UTF-8 character (byte-level BPE and byte-fallback tokens split characters).
    ``finish()`` returns whatever is still held back when the stream ends (a final incomplete
    character decodes to U+FFFD, as a full decode gives it), so the pieces always add up to
    ``decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._emitted = 0

    def step(self, token_id: int) -> str:
        """Text completed by ``token_id``."""
        self._ids.append(int(token_id))
        piece = self._stream.step(self._backend, int(token_id)) or ""
        self._emitted += len(piece)
        return piece

    def finish(self) -> str:
        """The text held back at the end of the stream."""
        full = self._backend.decode(self._ids, skip_special_tokens=self._skip)
        rest = full[self._emitted :]
        self._emitted = len(full)
        return rest


def _special_id(backend: tokenizers.Tokenizer, value: object) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str):
        return backend.token_to_id(value)
    return None


def _from_hf_dir(directory: Path) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no tokenizer.json; evolm reads the fast-tokenizer file (save one with "
            "transformers' `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for malformed files
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from e
    # A saved tokenizer.json may carry the fixed padding/truncation it was exported with
    # (sentence-transformers: pad to 128); encode() returns exactly the text's ids, as transformers does.
    backend.no_padding()
    backend.no_truncation()
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = directory / name
        if p.is_file():
            try:
                cfg.update(json.loads(p.read_text()))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p} is not valid JSON: {e}") from e
    template = cfg.get("chat_template")
    tpl_file = directory / "chat_template.jinja"
    if template is None and tpl_file.is_file():
        template = tpl_file.read_text()
    if isinstance(template, list):  # several named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return Tokenizer(
        backend=backend,
        bos_token_id=_special_id(backend, cfg.get("bos_token")),
        eos_token_id=_special_id(backend, cfg.get("eos_token")),
        pad_token_id=_special_id(backend, cfg.get("pad_token")),
        add_bos=bool(cfg.get("add_bos_token", False)),
        chat_template=template,
        source=str(directory),
    )


def _from_gguf(path: Path) -> Tokenizer:
    from evolm.tokenizer.gguf_vocab import read_gguf_vocab

    v = read_gguf_vocab(path)
    return Tokenizer(
        backend=v.tokenizer,
        bos_token_id=v.bos_token_id,
        eos_token_id=v.eos_token_id,
        pad_token_id=v.pad_token_id,
        add_bos=v.add_bos_token,
        chat_template=v.chat_template,
        source=str(path),
    )


def load_tokenizer(path: str | Path, model: nn.Module | None = None) -> Tokenizer:
    """Load the tokenizer of a Hugging Face directory (``tokenizer.json``) or a ``.gguf`` file.

    Args:
        path: Checkpoint directory or GGUF file.
        model: If given, check that every id the tokenizer can produce exists in the model.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; pass a model directory or a .gguf file")
    tok = _from_gguf(p) if p.is_file() and p.suffix == ".gguf" else _from_hf_dir(p if p.is_dir() else p.parent)
    if model is not None:
        tok.check_model(model)
    return tok
