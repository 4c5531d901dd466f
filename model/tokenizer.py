"""Tokenizer glue: ``tokenizers`` from the store's tokenizer.json, and the checkpoint's chat template."""
from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.decoders import DecodeStream


class Tokenizer:
    """Encodes prompts (raw, or through the model's chat template) and decodes streamed tokens."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.tok = _HFTokenizer.from_str(spec["json"])
        self.chat_template: str | None = spec.get("chat_template")
        self.bos_token: str | None = spec.get("bos_token")
        self.eos_token: str | None = spec.get("eos_token")
        self._template: Any = None  # the compiled chat template, built on first use

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, *, raw: bool = True) -> list[int]:
        """Token ids of a prompt; without ``raw`` the prompt becomes a user turn of the chat template."""
        if not raw and self.chat_template:
            text = self.render_chat([{"role": "user", "content": text}])
            ids = self.tok.encode(text, add_special_tokens=False).ids
        else:  # the tokenizer's own post-processor adds BOS where the model wants one
            ids = self.tok.encode(text, add_special_tokens=True).ids
        return ids

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise jinja2.exceptions.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template or "")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns streamed ids into text deltas, never splitting a multi-byte character.

    ``tokenizers``' own ``DecodeStream`` keeps a small window of recent ids, so each token costs the
    same however long the text grows (re-decoding every id at every token would be quadratic).
    """

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self._stream = DecodeStream(skip_special_tokens=True)
        self._held: list[int] = []  # ids whose text the stream holds back (an unfinished character)

    def push(self, token: int) -> str:
        # None: the id ends in the middle of a UTF-8 sequence; its text comes with a later id
        text = self._stream.step(self.tok.tok, token)
        self._held = [] if text is not None else self._held + [token]
        return text or ""

    def flush(self) -> str:
        """At the end of a generation: the held ids' text (a character never finished decodes as U+FFFD,
        as ``decode`` of the whole text gives it)."""
        text, self._held = (self.tok.decode(self._held) if self._held else ""), []
        return text
