"""Judges of a student's response against the teacher's (``fastdadpo eval``).

``exact`` (a response is right iff it matches the row's ``"answer"``, or one of its list of right
answers, after ``normalize_answer``; a win is student right and teacher wrong), ``model`` (a local causal
LM reads both answers and its next-token probabilities of "A" and "B" decide) and ``http`` (an
OpenAI-compatible chat endpoint replies "A", "B" or "tie"). ``model`` and ``http`` see every pair in
both orders, teacher first and student first, and a verdict counts as a win or loss only when
both orders agree (else a tie), which cancels the judge's position bias.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from fastdadpo.base.endpoint import Endpoint, split_http_url
from fastdadpo.base.errors import ConfigError, DataError, UserError
from fastdadpo.base.workers import DaemonPool
from fastdadpo.core.batch import pad_token_id, padded
from fastdadpo.core.chat import Message, prompt_ids
from fastdadpo.core.rows import Example
from fastdadpo.models.loading import (final_hidden_states, head_weight, load_causal_lm, load_tokenizer, release_memory,
                                      require_model_dir, resolve_device, resolve_dtype)

WIN, LOSS, TIE = "win", "loss", "tie"


def normalize_answer(text: str) -> str:
    """What ``exact`` compares: the text lowered, with its whitespace collapsed."""
    return " ".join(text.strip().lower().split())


def is_correct(response: str, answer: Union[None, str, Sequence[str]]) -> bool:
    """Matches the answer, or any one of several right answers, after ``normalize_answer``."""
    if answer is None:
        return False
    answers = (answer,) if isinstance(answer, str) else answer
    return normalize_answer(response) in {normalize_answer(a) for a in answers}


# --- judges ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """One prompt's student response against the teacher's."""
    question: str
    reference: Union[None, str, Sequence[str]]  # the right answer, or every right answer
    teacher: str
    student: str


@dataclass(frozen=True)
class Comparison:
    """What a preference judge is asked: which of two answers to a question is better."""
    question: str
    answer_a: str
    answer_b: str


class Judge:
    """Decides each pair: WIN (the student's response is better), LOSS or TIE."""
    name = ""
    needs_answers = False

    def judge(self, pairs: Sequence[Pair]) -> List[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}

    def check_replies(self) -> Optional[str]:
        """After judging: a note on replies the judge could not read (None: nothing to say); raises
        when too many of them make the figures meaningless."""
        return None

    def close(self) -> None:
        """Release what the judge holds (a model)."""


class ExactJudge(Judge):
    """Right or wrong against the reference answer: a win is the student right and the teacher wrong."""
    name = "exact"
    needs_answers = True

    def judge(self, pairs: Sequence[Pair]) -> List[str]:
        outcomes = []
        for pair in pairs:
            student_right = is_correct(pair.student, pair.reference)
            teacher_right = is_correct(pair.teacher, pair.reference)
            outcomes.append(WIN if student_right and not teacher_right else
                            LOSS if teacher_right and not student_right else TIE)
        return outcomes


def combine_orders(teacher_first: str, student_first: str) -> str:
    """The outcome from the verdicts ("A", "B" or "tie") with the teacher's response shown as A, then
    the student's: a win or loss only when both orders prefer the same response."""
    if teacher_first == "B" and student_first == "A":
        return WIN
    if teacher_first == "A" and student_first == "B":
        return LOSS
    return TIE


class PreferenceJudge(Judge):
    """A judge that prefers answer "A", "B" or neither ("tie"); every pair is asked in both orders."""

    def prefer(self, comparisons: Sequence[Comparison]) -> List[str]:
        raise NotImplementedError

    def judge(self, pairs: Sequence[Pair]) -> List[str]:
        teacher_first = [Comparison(p.question, p.teacher, p.student) for p in pairs]
        student_first = [Comparison(p.question, p.student, p.teacher) for p in pairs]
        verdicts = self.prefer(teacher_first + student_first)
        return [combine_orders(a, b) for a, b in zip(verdicts[:len(pairs)], verdicts[len(pairs):])]


JUDGE_PROMPT = """Compare two answers to the same request and decide which one is better: more helpful, \
correct and clear. Judge the content, not the length or the order in which the answers are shown.

[Request]
{question}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

{instruction}"""


def judge_messages(comparison: Comparison, instruction: str) -> List[Message]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=comparison.question, answer_a=comparison.answer_a,
                                                            answer_b=comparison.answer_b, instruction=instruction)}]


class ModelJudge(PreferenceJudge):
    """A local causal LM, asked through its chat template, answers with the letter of the better
    answer; ``log p("A") − log p("B")`` of its first reply token decides (both spellings "A" and " A"
    counted where they are single tokens). The model is loaded at the first question."""
    name = "model"
    instruction = "Reply with one letter: A or B."

    def __init__(self, model_dir: Optional[str], *, device: Optional[torch.device] = None,
                 dtype: Optional[str] = None, batch_size: int = 8):
        if not model_dir:
            raise ConfigError("--judge-model: the model judge needs a local model directory to ask")
        require_model_dir(model_dir, "--judge-model")
        self.model_dir, self.device, self.dtype_name = model_dir, resolve_device(device), dtype
        self.batch_size = batch_size
        self._loaded = None

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model_dir}

    def _load(self):
        if self._loaded is None:
            tokenizer = load_tokenizer(self.model_dir, "--judge-model")
            model = load_causal_lm(self.model_dir, dtype=resolve_dtype(self.dtype_name, self.device),
                                   device=self.device, key="--judge-model")
            self._loaded = (model, tokenizer, _letter_ids(tokenizer, "A"), _letter_ids(tokenizer, "B"))
        return self._loaded

    def score(self, comparisons: Sequence[Comparison]) -> List[float]:
        """``log p("A") − log p("B")`` of the judge's first reply token, per comparison."""
        model, tokenizer, a_ids, b_ids = self._load()
        prompts = [prompt_ids(tokenizer, judge_messages(c, self.instruction)) for c in comparisons]
        letters = head_weight(model)[a_ids + b_ids]
        scores: List[float] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            input_ids, attention_mask = padded(chunk, pad_token_id(tokenizer))
            with torch.inference_mode():
                attention_mask = attention_mask.to(self.device)
                hidden = final_hidden_states(model, input_ids.to(self.device), attention_mask)
                last = hidden[torch.arange(len(chunk), device=self.device), attention_mask.sum(1) - 1]
                logits = last.float() @ letters.float().T   # only the letters' logits: softmax's normalizer cancels
                scores += (logits[:, :len(a_ids)].logsumexp(-1) - logits[:, len(a_ids):].logsumexp(-1)).tolist()
        return scores

    def prefer(self, comparisons: Sequence[Comparison]) -> List[str]:
        return ["A" if s > 0 else "B" if s < 0 else "tie" for s in self.score(comparisons)]

    def close(self) -> None:
        self._loaded = None
        release_memory()


def _letter_ids(tokenizer, letter: str) -> List[int]:
    ids = sorted({encoded[0] for text in (letter, " " + letter)
                  if len(encoded := tokenizer.encode(text, add_special_tokens=False)) == 1})
    if not ids:
        raise ConfigError(f"--judge-model: its tokenizer has no single token for {letter!r}, so the judge's "
                          f"choice cannot be read from one next-token distribution")
    return ids


_BRACKETED_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)   # MT-bench style; C is a tie
_WHOLE_VERDICT = re.compile(r"\W*(?:answer\s+)?(A|B|tie)\W*", re.IGNORECASE)
_LETTER = re.compile(r"\b(A|B)\b")
_TIE_WORD = re.compile(r"\btie\b", re.IGNORECASE)


def parse_verdict(reply: str) -> Optional[str]:
    """"A", "B" or "tie" from a judge's reply; None when it names no single verdict. Accepted: a bare
    verdict ("B", "Answer A.", "tie"), a bracketed one ("[[A]]"), or text that names exactly one of
    the capital letters A and B as a word and no tie ("Answer B is better")."""
    bracketed = _BRACKETED_VERDICT.search(reply)
    if bracketed:
        verdict = bracketed.group(1).upper()
        return "tie" if verdict in ("C", "TIE") else verdict
    whole = _WHOLE_VERDICT.fullmatch(reply.strip())
    if whole:
        verdict = whole.group(1)
        return "tie" if verdict.lower() == "tie" else verdict.upper()
    letters = set(_LETTER.findall(reply))
    if _TIE_WORD.search(reply):
        return "tie" if not letters else None
    return letters.pop() if len(letters) == 1 else None


def chat_completions_url(url: str) -> str:
    """``url`` if its path names the chat completions route, else that path + ``/v1/chat/completions``
    (``/chat/completions`` after a ``/v1``); the query string is kept, a fragment dropped."""
    split_http_url(url, "--judge-url")
    return Endpoint(url, flag="--judge-url", what="the judge endpoint", allow_http=True).url("chat/completions")


class HttpJudge(PreferenceJudge):
    """An OpenAI-compatible chat endpoint, asked at temperature 0 to reply "A", "B" or "tie". Requests
    run ``workers`` at a time through ``base.endpoint`` (credentials, redirects, retries of 429, 5xx
    and timeouts, whole-request bounds). A reply naming no verdict counts as a tie (and is counted in
    ``describe()``)."""
    name = "http"
    instruction = "Reply with exactly one of: A, B, or tie."
    # More unreadable replies than this share of the comparisons, and the preference figures are
    # ties by default, not the judge's: the evaluation fails (its results written first).
    max_unparsed_share = 0.5

    def __init__(self, url: Optional[str], model: Optional[str], *, api_key_env: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 2, backoff: float = 1.0, workers: int = 8, max_tokens: int = 16,
                 allow_http: bool = False):
        # A chat completion naming a verdict is a few hundred bytes: 1 MiB is far past any.
        self.server = Endpoint(url, flag="--judge-url", what="the judge endpoint", api_key_env=api_key_env,
                               api_key_flag="--judge-api-key-env", allow_http=allow_http,
                               allow_http_flag="--judge-allow-http", timeout=timeout, timeout_flag="--judge-timeout",
                               retries=retries, backoff=backoff, max_reply_bytes=1 << 20)
        if not model:
            raise ConfigError("--judge-model: the http judge needs the model name the endpoint serves")
        self.model, self.workers, self.max_tokens = model, workers, max_tokens
        self.display, self.endpoint = self.server.display, self.server.url("chat/completions")
        self.unparsed_replies, self.asked = 0, 0

    def describe(self) -> dict:
        return {"name": self.name, "url": self.display, "model": self.model,
                "unparsed_replies": self.unparsed_replies, "asked": self.asked}

    def check_replies(self) -> Optional[str]:
        """A note when replies named no verdict; raises past ``max_unparsed_share`` of them."""
        if not self.unparsed_replies:
            return None
        note = (f"the judge's replies to {self.unparsed_replies} of {self.asked} comparisons named no verdict (A, B or "
                f"tie) and count as ties")
        if self.unparsed_replies > self.max_unparsed_share * self.asked:
            raise UserError(f"{note}: more than {self.max_unparsed_share:.0%}, so the preference figures would be the "
                            f"default's, not {self.display}'s ({self.model}). Check that the endpoint serves a chat "
                            f"model that follows the instruction (an empty or null message content is not a reply)")
        return note

    def prefer(self, comparisons: Sequence[Comparison]) -> List[str]:
        with DaemonPool(self.workers) as pool:
            verdicts = [parse_verdict(reply) for reply in pool.map(self.ask, comparisons)]
        self.unparsed_replies += sum(v is None for v in verdicts)
        self.asked += len(verdicts)
        return [v or "tie" for v in verdicts]

    def ask(self, comparison: Comparison) -> str:
        """The endpoint's reply text to one comparison."""
        reply = self.server.request("chat/completions", {
            "model": self.model, "messages": judge_messages(comparison, self.instruction), "temperature": 0,
            "max_tokens": self.max_tokens})
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"the judge endpoint {self.display} sent a reply that is not an OpenAI chat completion "
                            f"(no choices[0].message.content): {self.server.redacted(repr(reply)[:200])}") from None
        return content if isinstance(content, str) else ""


@dataclass
class JudgeOptions:
    model: Optional[str] = None          # model judge: a local directory; http judge: the served model's name
    url: Optional[str] = None
    api_key_env: Optional[str] = None
    timeout: float = 60.0
    allow_http: bool = False             # plain http:// to a host other than this machine
    workers: int = 8
    batch_size: int = 8
    device: Optional[torch.device] = None
    dtype: Optional[str] = None


JUDGES = {
    "exact": lambda options: ExactJudge(),
    "model": lambda options: ModelJudge(options.model, device=options.device, dtype=options.dtype,
                                        batch_size=options.batch_size),
    "http": lambda options: HttpJudge(options.url, options.model, api_key_env=options.api_key_env,
                                      timeout=options.timeout, workers=options.workers,
                                      allow_http=options.allow_http),
}


def build_judge(name: str, options: Optional[JudgeOptions] = None) -> Judge:
    if name not in JUDGES:
        raise ConfigError(f"--judge: unknown judge {name!r}; choose one of {', '.join(JUDGES)}")
    return JUDGES[name](options or JudgeOptions())


def check_judge_data(judge: Judge, examples: Sequence[Example]) -> None:
    if not judge.needs_answers:
        return
    missing = [e for e in examples if e.answer is None]
    if missing:
        raise DataError(f"the {judge.name} judge needs a reference 'answer' in every row, but {missing[0].source} "
                        f"has none ({len(missing)} of {len(examples)} rows lack one); use --judge model or --judge "
                        f"http for prompts without verifiable answers")


def pairwise_summary(outcomes: Sequence[str]) -> dict:
    """Counts, rates, and the paper's preference rate (wins − losses) / pairs."""
    n = len(outcomes)
    wins, losses, ties = outcomes.count(WIN), outcomes.count(LOSS), outcomes.count(TIE)
    return {"wins": wins, "losses": losses, "ties": ties, "win_rate": wins / n, "loss_rate": losses / n,
            "tie_rate": ties / n, "preference_rate": (wins - losses) / n}
