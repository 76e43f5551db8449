"""A model behind an OpenAI-compatible server (vLLM, SGLang, TGI): sampling and per-token log-probs
of exact token ids, for ``fastdadpo generate --teacher-url`` and the cached tables of ``dadpo`` and
``dpo`` (``model.teacher_url``), so that a teacher too big to sit beside the student is never loaded
by the trainer.

Prompts travel as token ids (``/v1/completions`` takes a list of ints for ``prompt``: vLLM and
SGLang accept it), so the server sees exactly the tokens the trainer trains on, after the chat
template applied here with the local tokenizer. Log-probs come from vLLM's ``prompt_logprobs``
extension (the log-prob of every prompt token given those before it, from the raw logits); a server
without it (TGI, hosted APIs) is refused in one paragraph where log-probs are needed.

Sampling sends the sampling settings in full, vLLM's extensions included (``top_k: -1``,
``repetition_penalty: 1``, ``min_p: 0``): a server otherwise applies the model's
``generation_config.json`` defaults, and the responses would not be samples of the model itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

from fastdadpo.base.endpoint import Endpoint
from fastdadpo.base.errors import UserError
from fastdadpo.base.workers import DaemonPool

# Compared with a tokenization through the server where it has vLLM's /tokenize: a different
# tokenizer behind the URL splits at least one of these differently (digits, accents, CJK, emoji).
TOKENIZER_PROBE = "The quick brown fox, 12345 + 678 = 13023. Ünïcödé 漢字 🙂\n\tdone."
# The identity of the weights behind a URL: a served model's log-probs of this text (or, on a server
# without prompt_logprobs, its greedy continuation). Another model at the same name differs far past
# ``PROBE_TOLERANCE`` (nats per token); the same model, restarted, differs only by its numerics.
PROBE_TEXT = "Distillation transfers what a large model knows into a small one."
PROBE_TOLERANCE = 0.05
PROBE_TOKENS = 17


@dataclass(frozen=True)
class ServerSettings:
    """How to reach the servers of one command (the flags or config keys they came from)."""
    api_key_env: Optional[str] = None  # environment variable holding the API key (sent as a Bearer token)
    allow_http: bool = False  # plain http:// to another machine (the prompts and the key unencrypted)
    timeout: float = 600.0  # seconds for one request, whole (a long response at a busy server)
    retries: int = 3  # of a request that timed out or got HTTP 429/5xx
    backoff: float = 1.0  # seconds before the first retry, doubled at each next one
    # Requests in flight per server: enough to keep a vLLM server's continuous batching full.
    concurrency: int = 16

    def validate(self, fail, key: Callable[[str], str]) -> None:
        """``fail(key(field), problem)`` for each bad field (``key`` spells a field as its user gave it)."""
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            fail(key("timeout"), f"must be a positive number of seconds, got {self.timeout}")
        if not 0 <= self.retries <= 100:
            fail(key("retries"), f"must be from 0 to 100, got {self.retries}")
        if not 0 <= self.backoff <= 600:
            fail(key("backoff"), f"must be from 0 to 600 seconds, got {self.backoff}")
        if not 1 <= self.concurrency <= 1024:
            fail(key("concurrency"), f"must be a whole number of requests from 1 to 1024, got {self.concurrency}")


def served_problem(role: str, path: Optional[str], url: Optional[str], name: Optional[str], objective):
    """(key, problem) when ``model.{role}_url`` cannot serve what ``objective`` needs of ``role``, else None."""
    needs = objective.needs()
    if name and not url:
        return f"model.{role}_model_name", f"names a served model: set model.{role}_url too"
    if not url:
        return None
    if role in needs.online:
        return (f"model.{role}_url", f"objective {objective.name!r} reads the {role}'s whole next-token "
                f"distribution at every step, which no server gives; only the cached sequence log-probs of dadpo "
                f"and dpo can come from a server. Drop model.{role}_url to load the {role} beside the student")
    if role not in needs.cached:
        return f"model.{role}_url", f"is set, but objective {objective.name!r} never uses the {role}; drop it"
    if not path:
        return (f"model.{role}_url", f"needs model.{role} too: its tokenizer and config (the weights are not "
                f"needed), to check the server's tokenizer and to plan")
    return None


class ServedModel:
    """One model at ``url`` (``flag`` names where it was given). ``name`` is the model the server
    serves under (``--served-model-name``); by default the only one it lists."""

    def __init__(self, url: str, *, flag: str, settings: ServerSettings, name: Optional[str] = None,
                 role: str = "model", setting_flag: Callable[[str], str] = lambda name: f"model.server.{name}"):
        """``setting_flag`` names each ServerSettings field where the user sets it (a config key by
        default; generate's flags), for the messages that tell what to change."""
        self.flag, self.settings, self.role = flag, settings, role
        # A reply of prompt log-probs is ~100 bytes per token: 64 MiB holds every sequence a trainer takes.
        self.server = Endpoint(url, flag=flag, what=f"the {role}'s server", api_key_env=settings.api_key_env,
                               api_key_flag=setting_flag("api_key_env"), allow_http=settings.allow_http,
                               allow_http_flag=setting_flag("allow_http"), timeout=settings.timeout,
                               timeout_flag=setting_flag("timeout"), retries=settings.retries,
                               backoff=settings.backoff, max_reply_bytes=64 << 20)
        self.name = self._served_name(name)

    # --- what is served ------------------------------------------------------------------------------------

    def _served_name(self, name: Optional[str]) -> str:
        listed = self.server.request("models", retries=1).get("data")
        if not isinstance(listed, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                   for m in listed):
            raise UserError(f"{self.flag} {self.server.display}: /v1/models did not list models ({{'data': "
                            f"[{{'id': ...}}]}}); is it an OpenAI-compatible server?")
        self._listed = {m["id"]: m for m in listed}
        if name is not None and name not in self._listed:
            raise UserError(f"{self.flag} {self.server.display} serves {_names(self._listed)}, not {name!r}; give "
                            f"the name it serves the {self.role} under")
        if name is None and len(self._listed) != 1:
            raise UserError(f"{self.flag} {self.server.display} serves {_names(self._listed) or 'no model'}; name "
                            f"the {self.role}'s with its --{self.role}-model-name")
        return name or next(iter(self._listed))

    def identity(self, tokenizer, *, require_logprobs: bool = False) -> dict:
        """What a run records of the model: its listing (name, weights' path, context length) and its
        answer to the probe (log-probs where the server gives them, else a greedy continuation)."""
        listing = {key: self._listed[self.name].get(key) for key in ("id", "root", "parent", "max_model_len")}
        probe_ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)[:PROBE_TOKENS]
        try:
            probe = [round(value, 4) for value in self.prompt_logprobs(probe_ids)]
        except PromptLogprobsUnsupported:
            if require_logprobs:
                raise
            probe = self.complete(probe_ids, max_tokens=16, temperature=0.0, top_p=1.0, seed=0)
        return {"url": self.server.display, **listing, "probe": probe}

    def check_tokenizer(self, tokenizer) -> Optional[str]:
        """Refuse a server whose tokenizer splits the probe otherwise than ``tokenizer``. Returns a note
        when the server cannot tokenize (no /tokenize route: not checked)."""
        reply = self.server.request("/tokenize", {"model": self.name, "prompt": TOKENIZER_PROBE,
                                                  "add_special_tokens": False}, missing_ok=True)
        if reply is None:
            return (f"{self.flag}: the server has no /tokenize route, so its tokenizer could not be compared with "
                    f"the local one; they must match, token for token")
        served, local = reply.get("tokens"), tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
        if served != local:
            raise UserError(f"{self.flag} {self.server.display} ({self.name}) tokenizes a probe text into "
                            f"{_preview(served)} where the local tokenizer gives {_preview(local)}: it serves a model "
                            f"with another tokenizer, and the token ids sent to it would mean other text. Serve the "
                            f"model whose tokenizer is given locally")
        return None

    # --- requests ------------------------------------------------------------------------------------------

    def complete(self, prompt_ids: Sequence[int], *, max_tokens: int, temperature: float, top_p: float,
                 seed: int) -> str:
        """One response to ``prompt_ids`` (the text the server decodes, special tokens left out, stripped
        as in-process responses are)."""
        reply = self.server.request("completions", {
            "model": self.name, "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p if temperature > 0 else 1.0, "seed": seed, "n": 1, "top_k": -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "skip_special_tokens": True})
        choice = self._choice(reply)
        text, finish = choice.get("text"), choice.get("finish_reason")
        if not isinstance(text, str):
            raise self._malformed("a completion without choices[0].text", reply)
        produced = (reply.get("usage") or {}).get("completion_tokens")
        if finish == "length" and isinstance(produced, int) and produced < max_tokens:
            raise UserError(f"{self.flag} {self.server.display} cut a response at {produced} tokens of the "
                            f"{max_tokens} asked (finish_reason 'length'): its context ({self._listed[self.name].get('max_model_len')} "
                            f"tokens) is too short for the prompt and --max-new-tokens; raise its --max-model-len "
                            f"or lower --max-new-tokens / --max-prompt-length")
        return text.strip()

    def prompt_logprobs(self, ids: Sequence[int]) -> List[float]:
        """log p(ids[t] | ids[:t]) for t = 1 .. len(ids) − 1, from the raw logits."""
        reply = self.server.request("completions", {
            "model": self.name, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
        entries = self._choice(reply).get("prompt_logprobs")
        if entries is None:
            raise PromptLogprobsUnsupported(
                f"{self.flag} {self.server.display} returned no 'prompt_logprobs': the per-token log-probs of "
                f"given token ids are vLLM's extension of /v1/completions (vllm serve gives them; SGLang, TGI and "
                f"hosted APIs do not through this route). Serve the {self.role} with vLLM, or give it as a local "
                f"model directory")
        if not isinstance(entries, list) or len(entries) != len(ids):
            got = len(entries) if isinstance(entries, list) else type(entries).__name__
            raise UserError(f"{self.flag} {self.server.display} returned log-probs for {got} tokens of the "
                            f"{len(ids)} sent; its context ({self._listed[self.name].get('max_model_len')} tokens) "
                            f"may be shorter than the sequence, or it is not the server this expects")
        values = []
        for position in range(1, len(ids)):
            entry = entries[position]
            found = entry.get(str(ids[position])) if isinstance(entry, dict) else None
            value = found.get("logprob") if isinstance(found, dict) else found
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value > 1e-3:
                raise self._malformed(f"no log-prob of token {ids[position]} at position {position}", reply)
            values.append(float(value))
        return values

    def _choice(self, reply: dict) -> dict:
        choices = reply.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._malformed("a reply without choices[0]", reply)
        return choices[0]

    def _malformed(self, what: str, reply) -> UserError:
        return UserError(f"{self.flag} {self.server.display} sent {what}: "
                         f"{self.server.redacted(repr(reply)[:200])}; is it an OpenAI-compatible completions server?")


class PromptLogprobsUnsupported(UserError):
    pass


def probe_matches(recorded, now) -> bool:
    """The same model answers the probe the same (log-probs within ``PROBE_TOLERANCE``; text exactly)."""
    if isinstance(recorded, list) and isinstance(now, list):
        return len(recorded) == len(now) and all(abs(a - b) <= PROBE_TOLERANCE for a, b in zip(recorded, now))
    return recorded == now


def in_flight(task: Callable, items: Iterable, concurrency: int) -> Iterable:
    """``task(item)`` for each item, ``concurrency`` at a time, yielded in the items' order as each
    finishes (so a caller writes results in order while later ones are still in flight). A failure
    cancels what has not started and is raised."""
    with DaemonPool(concurrency) as pool:
        yield from pool.map(task, items)


def _names(listed: dict) -> str:
    return ", ".join(repr(name) for name in listed)


def _preview(ids) -> str:
    return repr(ids[:12]) + ("…" if isinstance(ids, list) and len(ids) > 12 else "") if ids is not None else "nothing"
