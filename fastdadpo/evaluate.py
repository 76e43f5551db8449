"""Comparing students with their teacher, the way the daDPO paper reports it.

For held-out prompts (rows read by ``data.load_prompts``: ``"prompt"``; optionally ``"answer"``, a
verifiable reference answer; optionally ``"chosen"``, a teacher response):

(a) Divergence: mean per-token ``KL(teacher‖student)`` (forward) and ``KL(student‖teacher)``
    (reverse) at the response tokens of the teacher's responses (the data's ``"chosen"``, else the
    teacher's greedy responses), pooled over all response tokens of all rows. Computed by the fused
    kernel from the final hidden states and LM heads over the shared tokenizer's vocabulary (a padded
    head is compared on its first ``V`` rows, see ``data.check_tokenizers_compatible``), never
    materializing ``[tokens × vocab]`` logits.
(b) A pairwise comparison of each student's greedy response with the teacher's response: win, loss
    and tie rates and the preference rate ``(wins − losses) / pairs``. Judges (``JUDGES``):
    ``exact`` (a response is right iff it matches the row's ``"answer"`` after
    ``synthetic.normalize_answer``; a win is student right and teacher wrong), ``model`` (a local causal
    LM reads both answers and its next-token probabilities of "A" and "B" decide) and ``http`` (an
    OpenAI-compatible chat endpoint replies "A", "B" or "tie"). ``model`` and ``http`` see every pair in
    both orders, teacher first and student first, and a verdict counts as a win or loss only when
    both orders agree (else a tie), which cancels the judge's position bias.
(c) Accuracy: the fraction of responses matching ``"answer"``, over the rows that have one.

Memory: one model at a time. The teacher goes first: its responses, and its final hidden states at
the response positions and its LM head, kept on the CPU (``[response tokens × hidden]``: small next
to logits). Then each student in turn, then the judge (``model``).
"""
from __future__ import annotations

import gc
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .chat import Message, prompt_ids, response_ids
from .data import Example, check_tokenizers_compatible, load_prompts
from .errors import ConfigError, DataError, UserError
from .models import (count_parameters, final_hidden_states, head_rows, head_weight, load_causal_lm, load_tokenizer,
                     pad_token_id, require_model_dir, resolve_device, resolve_dtype, right_padded)
from .sampling import generate_texts
from .synthetic import normalize_answer

WIN, LOSS, TIE = "win", "loss", "tie"
DIVERGENCE_KINDS = ("forward_kl", "reverse_kl")


# --- examples ----------------------------------------------------------------------------------------------

def conversation_text(messages: Sequence[Message]) -> str:
    """A conversation as plain text, for judges and answer matching."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def is_correct(response: str, answer: Optional[str]) -> bool:
    return answer is not None and normalize_answer(response) == normalize_answer(answer)


def accuracy(responses: Sequence[str], examples: Sequence[Example]) -> Optional[float]:
    """Exact-match accuracy over the rows with an answer (None when no row has one)."""
    judged = [is_correct(r, e.answer) for r, e in zip(responses, examples) if e.answer is not None]
    return sum(judged) / len(judged) if judged else None


# --- judges ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    """One prompt's student response against the teacher's."""
    question: str
    reference: Optional[str]
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
            input_ids, attention_mask = right_padded(chunk, pad_token_id(tokenizer))
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
    """``url`` if it names the chat completions route, else ``url`` + ``/v1/chat/completions``."""
    if not re.match(r"https?://", url or ""):
        raise ConfigError(f"--judge-url: {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HttpJudge(PreferenceJudge):
    """An OpenAI-compatible chat endpoint, asked at temperature 0 to reply "A", "B" or "tie". Requests
    run ``workers`` at a time; timeouts, HTTP 429 and 5xx are retried ``retries`` times with
    exponential backoff; a refused connection or another HTTP error ends the run with a UserError.
    A reply naming no verdict counts as a tie (and is counted in ``describe()``)."""
    name = "http"
    instruction = "Reply with exactly one of: A, B, or tie."
    retryable_status = (429, 500, 502, 503, 504)

    def __init__(self, url: Optional[str], model: Optional[str], *, api_key_env: Optional[str] = None,
                 timeout: float = 60.0, retries: int = 2, backoff: float = 1.0, workers: int = 8, max_tokens: int = 16):
        self.endpoint = chat_completions_url(url)
        if not model:
            raise ConfigError("--judge-model: the http judge needs the model name the endpoint serves")
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.workers, self.max_tokens = workers, max_tokens
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            if not os.environ.get(api_key_env):
                raise ConfigError(f"--judge-api-key-env: the environment variable {api_key_env} is not set")
            self.headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        self.unparsed_replies = 0

    def describe(self) -> dict:
        return {"name": self.name, "url": self.endpoint, "model": self.model,
                "unparsed_replies": self.unparsed_replies}

    def prefer(self, comparisons: Sequence[Comparison]) -> List[str]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            verdicts = [parse_verdict(reply) for reply in pool.map(self.ask, comparisons)]
        self.unparsed_replies += sum(v is None for v in verdicts)
        return [v or "tie" for v in verdicts]

    def ask(self, comparison: Comparison) -> str:
        """The endpoint's reply text to one comparison."""
        body = json.dumps({"model": self.model, "messages": judge_messages(comparison, self.instruction),
                           "temperature": 0, "max_tokens": self.max_tokens}).encode("utf-8")
        request = urllib.request.Request(self.endpoint, data=body, headers=self.headers, method="POST")
        attempt = 0
        while True:
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._reply_text(response.read())
            except urllib.error.HTTPError as exc:
                if exc.code not in self.retryable_status or attempt == self.retries:
                    detail = exc.read().decode("utf-8", "replace")[:300]
                    raise UserError(f"the judge endpoint {self.endpoint} answered HTTP {exc.code} {exc.reason}: "
                                    f"{detail or 'no details'}; check --judge-url, --judge-model and the API "
                                    f"key") from None
            except urllib.error.URLError as exc:
                if isinstance(exc.reason, ConnectionRefusedError):
                    raise UserError(f"cannot reach the judge endpoint {self.endpoint}: connection refused. Start the "
                                    f"OpenAI-compatible server there, or pass the right --judge-url") from None
                if not isinstance(exc.reason, TimeoutError) or attempt == self.retries:
                    raise UserError(f"cannot reach the judge endpoint {self.endpoint}: {exc.reason}") from None
            except TimeoutError:
                if attempt == self.retries:
                    raise UserError(f"the judge endpoint {self.endpoint} sent no reply within {self.timeout:g} s, "
                                    f"{self.retries + 1} times; raise --judge-timeout or check the server") from None
            time.sleep(self.backoff * 2 ** attempt)
            attempt += 1

    def _reply_text(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"the judge endpoint {self.endpoint} sent a reply that is not an OpenAI chat completion "
                            f"(no choices[0].message.content): {raw[:200]!r}") from None
        return content if isinstance(content, str) else ""


@dataclass
class JudgeOptions:
    model: Optional[str] = None          # model judge: a local directory; http judge: the served model's name
    url: Optional[str] = None
    api_key_env: Optional[str] = None
    timeout: float = 60.0
    workers: int = 8
    batch_size: int = 8
    device: Optional[torch.device] = None
    dtype: Optional[str] = None


JUDGES = {
    "exact": lambda options: ExactJudge(),
    "model": lambda options: ModelJudge(options.model, device=options.device, dtype=options.dtype,
                                        batch_size=options.batch_size),
    "http": lambda options: HttpJudge(options.url, options.model, api_key_env=options.api_key_env,
                                      timeout=options.timeout, workers=options.workers),
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


# --- the teacher's pass and the students' ------------------------------------------------------------------

@dataclass
class TeacherPass:
    """What the students are compared with, kept after the teacher is released."""
    tokenizer: object
    responses: List[str]
    sequences: List[Tuple[List[int], List[int]]]     # (prompt ids, response ids) of the teacher's responses
    hidden: List[torch.Tensor]                       # per row, on the CPU: [response tokens, hidden] predicting them
    head: torch.Tensor                               # the LM head, on the CPU
    parameters: int
    accuracy: Optional[float]

    @property
    def response_tokens(self) -> int:
        return sum(len(response) for _, response in self.sequences)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _length_batches(sequences: Sequence[Tuple[List[int], List[int]]], batch_size: int) -> List[List[int]]:
    """Row indices in batches of similar total length (little padding)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _response_hidden_states(model, sequences, rows: Sequence[int], pad_id: int, device) -> List[torch.Tensor]:
    """Final hidden states at the positions that predict each response token, one tensor per row."""
    input_ids, attention_mask = right_padded([sequences[i][0] + sequences[i][1] for i in rows], pad_id)
    hidden = final_hidden_states(model, input_ids.to(device), attention_mask.to(device))
    spans = [(len(sequences[i][0]) - 1, len(sequences[i][0]) + len(sequences[i][1]) - 1) for i in rows]
    return [hidden[row, start:end] for row, (start, end) in enumerate(spans)]


def _generate(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
              device) -> List[str]:
    prompts = [prompt_ids(tokenizer, e.prompt) for e in examples]
    return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                          batch_size=batch_size, device=device)


def teacher_pass(path: str, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
                 device: torch.device, dtype: torch.dtype) -> TeacherPass:
    """The teacher's responses (the rows' "chosen", else greedy), their tokens, and the teacher's
    final hidden states at them."""
    tokenizer = load_tokenizer(path, "--teacher")
    model = load_causal_lm(path, dtype=dtype, device=device, key="--teacher")
    missing = [e for e in examples if e.chosen is None]
    generated = iter(_generate(model, tokenizer, missing, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               device=device) if missing else [])
    # A generated response is kept as it came out, even when empty (as_messages would refuse that).
    responses = [e.chosen or [{"role": "assistant", "content": next(generated)}] for e in examples]
    sequences = []
    for example, response in zip(examples, responses):
        prompt = prompt_ids(tokenizer, example.prompt)
        sequences.append((prompt, response_ids(tokenizer, example.prompt, response, prompt_token_ids=prompt)))
    hidden: List[Optional[torch.Tensor]] = [None] * len(examples)
    with torch.inference_mode():
        for rows in _length_batches(sequences, batch_size):
            for row, states in zip(rows, _response_hidden_states(model, sequences, rows, pad_token_id(tokenizer),
                                                                 device)):
                hidden[row] = states.cpu()
    texts = [conversation_text(r) for r in responses]
    return TeacherPass(tokenizer=tokenizer, responses=texts, sequences=sequences, hidden=hidden,
                       head=head_weight(model).detach().cpu().clone(), parameters=count_parameters(model),
                       accuracy=accuracy(texts, examples))


def divergences(model, teacher: TeacherPass, *, vocab_size: int, batch_size: int,
                device: torch.device) -> Dict[str, Optional[float]]:
    """Mean per-token forward and reverse KL between the teacher and ``model`` over the first
    ``vocab_size`` rows of their heads, at the response tokens of the teacher's responses (pooled)."""
    from .kernels import fused_linear_divergence

    sums = dict.fromkeys(DIVERGENCE_KINDS, 0.0)
    tokens = 0
    teacher_head, student_head = teacher.head.to(device), head_weight(model)
    pad_id = pad_token_id(teacher.tokenizer)
    with torch.inference_mode():
        for rows in _length_batches(teacher.sequences, batch_size):
            student_hidden = torch.cat(_response_hidden_states(model, teacher.sequences, rows, pad_id, device))
            if not len(student_hidden):
                continue
            teacher_hidden = torch.cat([teacher.hidden[row] for row in rows]).to(device)
            for kind in DIVERGENCE_KINDS:
                per_token = fused_linear_divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                                                    kind=kind, vocab_size=vocab_size)
                sums[kind] += float(per_token.double().sum())
            tokens += len(student_hidden)
    return {kind: (total / tokens if tokens else None) for kind, total in sums.items()}


def student_pass(name: str, path: str, examples: Sequence[Example], teacher: TeacherPass, *,
                 max_new_tokens: int, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One student's row: its greedy responses, their accuracy, its divergence to the teacher."""
    key = f"student {name!r}"
    tokenizer = load_tokenizer(path, key)
    model = load_causal_lm(path, dtype=dtype, device=device, key=key)
    vocab_size = check_tokenizers_compatible(tokenizer, teacher.tokenizer, student_head_rows=head_rows(model),
                                             teacher_head_rows=teacher.head.shape[0])
    responses = _generate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          device=device)
    return {"path": path, "parameters": count_parameters(model), "accuracy": accuracy(responses, examples),
            **divergences(model, teacher, vocab_size=vocab_size, batch_size=batch_size, device=device),
            "responses": responses}


# --- evaluating several students against one teacher -------------------------------------------------------

def evaluate_models(teacher_dir: str, students: Mapping[str, str], examples: Sequence[Example], *,
                    judge: Union[str, Judge] = "exact", max_new_tokens: int = 128, batch_size: int = 8,
                    device: Optional[Union[str, torch.device]] = None, dtype: Optional[str] = None,
                    teacher_name: str = "teacher") -> dict:
    """Evaluate every student (display name -> model directory) against the teacher on ``examples``
    (``data.load_prompts(path)``), sharing the teacher's responses and hidden states. Returns
    ``{"teacher", "judge", "examples", "answered", "response_tokens", "max_new_tokens", "models"}``,
    ``models`` mapping display names to rows, the teacher's first (accuracy; divergence 0; no pairwise
    fields), then one per student: ``path, parameters, accuracy, forward_kl, reverse_kl, wins, losses,
    ties, win_rate, loss_rate, tie_rate, preference_rate, outcomes, responses``."""
    if not examples:
        raise DataError("no examples to evaluate on")
    judge = build_judge(judge) if isinstance(judge, str) else judge
    check_judge_data(judge, examples)
    if not students:
        raise ConfigError("no students to evaluate: give a --student model directory or a --students file")
    if teacher_name in students:
        raise ConfigError(f"a student is named {teacher_name!r}, the teacher's row; give it another name")
    require_model_dir(teacher_dir, "--teacher")
    for name, path in students.items():
        require_model_dir(path, f"student {name!r}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    teacher = teacher_pass(teacher_dir, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                           dtype=torch_dtype)
    release_memory()
    rows = {teacher_name: {"path": teacher_dir, "parameters": teacher.parameters, "accuracy": teacher.accuracy,
                           "forward_kl": 0.0, "reverse_kl": 0.0, "responses": teacher.responses}}
    for name, path in students.items():
        rows[name] = student_pass(name, path, examples, teacher, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, device=device, dtype=torch_dtype)
        release_memory()
    questions = [conversation_text(e.prompt) for e in examples]
    try:
        for name in students:
            outcomes = judge.judge([Pair(q, e.answer, t, s) for q, e, t, s in
                                    zip(questions, examples, teacher.responses, rows[name]["responses"])])
            rows[name].update(pairwise_summary(outcomes), outcomes=outcomes)
    finally:
        judge.close()
    return {"teacher": teacher_dir, "judge": judge.describe(), "examples": len(examples),
            "answered": sum(e.answer is not None for e in examples), "response_tokens": teacher.response_tokens,
            "max_new_tokens": max_new_tokens, "models": rows}


TABLE_COLUMNS = (("params", "parameters"), ("accuracy", "accuracy"), ("KL(t||s)", "forward_kl"),
                 ("KL(s||t)", "reverse_kl"), ("win", "win_rate"), ("tie", "tie_rate"), ("loss", "loss_rate"),
                 ("pref", "preference_rate"))


def _cell(key: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "parameters":
        return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.2f}M"
    if key in ("forward_kl", "reverse_kl"):
        return f"{value:.4f}"
    if key == "preference_rate":
        return f"{value:+.1%}"
    if isinstance(value, float):
        return f"{value:.1%}"
    return str(value)


def format_table(results: dict) -> str:
    """The results as a plain-text table: one row per model, the teacher first."""
    header = ["model"] + [title for title, _ in TABLE_COLUMNS]
    body = [[name] + [_cell(key, row.get(key)) for _, key in TABLE_COLUMNS] for name, row in results["models"].items()]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths)))

    judge = results["judge"]["name"]
    footer = (f"{results['examples']} prompts ({results['answered']} with answers), judge: {judge}, divergence over "
              f"{results['response_tokens']} teacher response tokens; pref = (wins - losses) / pairs")
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body] + [footer])


# --- command line ------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--student", action="append", default=[],
                        help="student model directory, named by its path (repeat to compare several)")
    parser.add_argument("--students", help="JSON file: an object mapping display names to student model directories")
    parser.add_argument("--teacher", required=True, help="teacher model directory")
    parser.add_argument("--data", required=True,
                        help="held-out rows (.jsonl, .json, .parquet or a saved dataset): 'prompt', optionally "
                             "'answer' and 'chosen' (a teacher response)")
    parser.add_argument("--judge", default="exact", help=f"pairwise judge: {', '.join(JUDGES)}")
    parser.add_argument("--judge-model",
                        help="model judge: a local model directory; http judge: the model name the endpoint serves")
    parser.add_argument("--judge-url", help="http judge: an OpenAI-compatible server (…/v1/chat/completions)")
    parser.add_argument("--judge-api-key-env", help="http judge: environment variable holding the API key")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="http judge: seconds per request")
    parser.add_argument("--judge-workers", type=int, default=8, help="http judge: requests in flight")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="evaluate on the first N rows only")
    parser.add_argument("--out", help="write the results (with every response) to this JSON file")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")


def _students(args) -> Dict[str, str]:
    """Display name -> model directory, from --students and --student."""
    students = {}
    if args.students:
        try:
            with open(args.students, encoding="utf-8") as handle:
                students = json.load(handle)
        except OSError as exc:
            raise ConfigError(f"--students: cannot read {args.students}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--students: {args.students} line {exc.lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(students, dict) or not all(isinstance(v, str) for v in students.values()):
            raise ConfigError(f"--students: {args.students} must hold one JSON object mapping display names to "
                              f"model directories")
    students.update({path: path for path in args.student})
    return students


def run(args) -> int:
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--limit", args.limit), ("--judge-workers", args.judge_workers)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag}: {value} must be at least 1")
    device = resolve_device(args.device)
    judge = build_judge(args.judge, JudgeOptions(model=args.judge_model, url=args.judge_url,
                                                 api_key_env=args.judge_api_key_env, timeout=args.judge_timeout,
                                                 workers=args.judge_workers, batch_size=args.batch_size,
                                                 device=device, dtype=args.dtype))
    examples = load_prompts(args.data)[:args.limit]
    results = evaluate_models(args.teacher, _students(args), examples, judge=judge,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                              dtype=args.dtype)
    print(format_table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0
