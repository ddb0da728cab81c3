"""Digests of a fixed set of greedy and seeded answers: token ids and the exact bits of every logprob.

Run it against two servers (say, before and after a refactor) and compare: equal digests mean the
same token ids and bit-identical logprobs, request by request. Speaks only the public API.

    python -m bench.output_digests --base-url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import hashlib
import json

import httpx2

CHAT = [{"role": "user", "content": "Name three rivers of Europe, briefly."}]
PROMPT = "The three largest cities of Italy are"


def requests(model: str) -> list[tuple[str, str, dict]]:
    """(name, path, body): chat and completions, greedy and seeded, n > 1, a grammar, scoring."""
    common = {"model": model, "max_tokens": 24, "return_token_ids": True}
    chat = {**common, "messages": CHAT, "logprobs": True, "top_logprobs": 3}
    text = {**common, "prompt": PROMPT, "logprobs": 3}
    return [
        ("chat greedy", "/v1/chat/completions", {**chat, "temperature": 0}),
        ("chat seeded n=2", "/v1/chat/completions", {**chat, "temperature": 0.8, "seed": 11, "n": 2}),
        ("chat json", "/v1/chat/completions", {**chat, "temperature": 0, "response_format": {"type": "json_object"}}),
        ("completion greedy", "/v1/completions", {**text, "temperature": 0}),
        ("completion seeded", "/v1/completions", {**text, "temperature": 1.0, "seed": 5, "top_p": 0.9}),
        ("completion fast greedy", "/v1/completions", {**text, "temperature": 0, "deterministic": False}),
        ("prompt scored", "/v1/completions", {**text, "echo": True, "max_tokens": 0, "temperature": 0}),
    ]


def _bits(values: list) -> list:
    """Each float as its exact hex form (None stays None), nested lists and dicts walked in order."""
    out = []
    for v in values:
        if isinstance(v, float):
            out.append(v.hex())
        elif isinstance(v, dict):
            out.append([[k, *_bits([x])] for k, x in sorted(v.items())])
        elif isinstance(v, list):
            out.append(_bits(v))
        else:
            out.append(v)
    return out


def choice_record(choice: dict) -> list:
    """A choice's token ids and logprob bits, for chat and completions alike."""
    logprobs = choice.get("logprobs") or {}
    if "content" in logprobs:  # chat
        entries = [[e["logprob"], [t["logprob"] for t in e["top_logprobs"]]] for e in logprobs["content"] or []]
    else:
        entries = [logprobs.get("token_logprobs"), logprobs.get("top_logprobs")]
    return [choice.get("token_ids"), choice.get("text", (choice.get("message") or {}).get("content")), _bits(entries)]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.output_digests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    with httpx2.Client(base_url=args.base_url, timeout=600) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        total = hashlib.sha256()
        for name, path, body in requests(model):
            response = http.post(path, json=body)
            response.raise_for_status()
            record = [choice_record(c) for c in sorted(response.json()["choices"], key=lambda c: c["index"])]
            digest = hashlib.sha256(json.dumps(record).encode()).hexdigest()[:16]
            total.update(digest.encode())
            print(f"{name:>24}  {digest}")
    print(f"{'all':>24}  {total.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
