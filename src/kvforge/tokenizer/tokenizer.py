"""Tokenizer: a ``tokenizers`` backend plus special tokens and the chat template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer

from kvforge.errors import InvalidRequestError, ModelNotFoundError
from kvforge.multimodal import IMAGE_MARKER
from kvforge.tokenizer.chat_template import RESERVED_TEMPLATE_NAMES, render_chat_template


class Tokenizer:
    """Text <-> token ids for one model, with BOS/EOS handling and chat templating."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: list[int],
        add_bos_token: bool,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        """The primary end-of-sequence token."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_text(self, token_id: int | None) -> str | None:
        """The vocabulary string of a token id."""
        return None if token_id is None else self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; prepends BOS when the model wants it and it is not there."""
        try:
            # encode_batch releases the GIL (encode does not): a long text cannot stall the
            # event loop or the engine thread while it is tokenized in a worker.
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        except Exception as exc:
            check_text(text)
            raise InvalidRequestError(f"cannot tokenize the text: {exc}", "prompt") from exc
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``."""
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def check_token_ids(self, token_ids: list[int], vocab_size: int, param: str = "prompt") -> None:
        """Raise InvalidRequestError for token ids outside the model's vocabulary."""
        for token_id in token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    f"token id {token_id} is out of range [0, {vocab_size})", param
                )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text with the model's (or the given) template.

        ``continue_final_message`` leaves the last (assistant) message open for the model to
        continue: the text is cut right after that message's content.
        """
        reserved = sorted(RESERVED_TEMPLATE_NAMES & kwargs.keys())
        if reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {reserved}", "chat_template_kwargs"
            )
        template = chat_template or self.chat_template
        if template is None:
            raise InvalidRequestError(
                "this model has no chat template; pass one with --chat-template", "messages"
            )
        special = {
            "bos_token": self.token_text(self.bos_token_id) or "",
            "eos_token": self.token_text(self.eos_token_id) or "",
        }
        if continue_final_message and add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt cannot both be true", "messages"
            )
        text = render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=special,
            tools=tools,
            **kwargs,
        )
        if continue_final_message:
            final = str(messages[-1].get("content") or "")
            cut = text.rfind(final) if final else -1
            if cut < 0:
                raise InvalidRequestError("cannot locate the final message to continue", "messages")
            text = text[: cut + len(final)]
        return text

    def encode_chat(
        self, messages: list[dict[str, Any]], image_token_id: int | None = None, **kwargs: Any
    ) -> list[int]:
        """Token ids of a rendered conversation (the template supplies BOS if it wants one);
        each image marker of the text becomes one ``image_token_id``."""
        text = self.apply_chat_template(messages, **kwargs)
        if image_token_id is not None and IMAGE_MARKER in text:
            ids: list[int] = []
            for index, piece in enumerate(text.split(IMAGE_MARKER)):
                if index:
                    ids.append(image_token_id)
                ids.extend(self.encode(piece, add_special_tokens=False) if piece else [])
        else:
            ids = self.encode(text, add_special_tokens=False)
        if (
            self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def save_hf_dir(self, path: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and the EOS ids in
        ``generation_config.json``: :meth:`from_hf_dir` reads back this tokenizer."""
        root = Path(path)
        self.backend.save(str(root / "tokenizer.json"))
        config: dict[str, Any] = {"add_bos_token": self.add_bos_token}
        if self.bos_token_id is not None:
            config["bos_token"] = self.token_text(self.bos_token_id)
        if self.eos_token_id is not None:
            config["eos_token"] = self.token_text(self.eos_token_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids}
        (root / "generation_config.json").write_text(json.dumps(generation, indent=2))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` and ``tokenizer_config.json`` from a model directory."""
        root = Path(path)
        if not (root / "tokenizer.json").exists():
            raise ModelNotFoundError(f"no tokenizer.json in {root}")
        backend = BackendTokenizer.from_file(str(root / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (root / "tokenizer_config.json").exists():
            config = json.loads((root / "tokenizer_config.json").read_text())
        gen_config: dict[str, Any] = {}
        if (root / "generation_config.json").exists():
            gen_config = json.loads((root / "generation_config.json").read_text())

        def token_id(name: str) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        eos_ids = gen_config.get("eos_token_id", token_id("eos_token"))
        eos_list = (
            eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
        )
        template = config.get("chat_template")
        if (root / "chat_template.jinja").exists():
            template = (root / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        post = backend.post_processor
        if post is not None:
            # BOS is added by ``encode`` explicitly; the backend's template would double it.
            backend.post_processor = None
        return cls(
            backend,
            bos_token_id=token_id("bos_token"),
            eos_token_ids=[int(e) for e in eos_list],
            add_bos_token=bool(
                config.get("add_bos_token", post is not None and token_id("bos_token") is not None)
            ),
            chat_template=template,
        )


def check_text(text: str, param: str = "prompt") -> None:
    """Raise InvalidRequestError for text that is not valid Unicode (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"{param} contains an invalid character (lone surrogate) at index {exc.start}", param
        ) from exc
