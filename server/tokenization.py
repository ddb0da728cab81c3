"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes."""

from __future__ import annotations

from detserve.server import tools
from detserve.server.protocol import APIError, DetokenizeRequest, TokenizeRequest
from detserve.server.serving import Serving, bad_request


class ServingTokenization(Serving):
    def tokenize(self, body: TokenizeRequest) -> dict:
        """`{prompt}` or `{messages}` (rendered by the chat template, as chat renders them) ->
        `{count, max_model_len, tokens, token_strs}` (the vocabulary's pieces, when asked for)."""
        info = self.model_info(body.model)
        with bad_request():
            if (body.prompt is None) == (body.messages is None):
                raise APIError(400, "send exactly one of prompt or messages", "prompt")
            body.refuse_not_served()
            tokenizer = self.engine.require_tokenizer()
            if body.messages is not None:
                messages = tools.prompt_messages([m.template_dict() for m in body.messages], [],
                                                 tokenizer.template_takes_tools)
                tokens = tokenizer.apply_chat_template(messages, body.add_generation_prompt,
                                                       continue_final_message=body.continue_final_message,
                                                       template_kwargs=body.chat_template_kwargs)
            else:
                tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        strs = tokenizer.hf.convert_ids_to_tokens(tokens) if body.return_token_strs else None  # vLLM's: raw pieces
        return {"count": len(tokens), "max_model_len": info.max_model_len, "tokens": tokens, "token_strs": strs}

    def tokenizer_info(self) -> dict:
        """The served tokenizer's configuration (vLLM's `/tokenizer_info`), so lm-eval's
        `tokenizer_backend=remote` needs no tokenizer of its own."""
        self.model_info(None)
        with bad_request():
            return self.engine.require_tokenizer().info()

    def detokenize(self, body: DetokenizeRequest) -> dict:
        """`{tokens}` -> `{prompt}`: the ids' text, special tokens included."""
        info = self.model_info(body.model)
        with bad_request():
            try:
                info.check_token_ids(body.tokens, "tokens")
            except ValueError as exc:
                raise APIError(400, str(exc), "tokens") from exc
            tokenizer = self.engine.require_tokenizer()
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}
