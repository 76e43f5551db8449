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
    and tie rates and the preference rate ``(wins − losses) / pairs``, decided by a judge
    (``fastdadpo.judges``: ``exact``, ``model``, ``http``).
(c) Accuracy: the fraction of responses matching ``"answer"`` (or one of its list of right
    answers), over the rows that have one.

Every model's row also keeps the per-prompt outcomes (``correct``, and each row's divergence sums
next to the shared ``row_tokens``), so paired comparisons over the same prompts can be made later;
with ``group_by`` (a field of the rows, e.g. a task family) the same summary is given per group.

Memory: one model at a time. The teacher goes first: its responses, and its final hidden states at
the response positions and its LM head, kept on the CPU (``[response tokens × hidden]``: small next
to logits). Then each student in turn, then the judge (``model``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from fastdadpo.base.errors import ConfigError, DataError, UserError
from fastdadpo.base.files import check_writable, write_text_atomic
from fastdadpo.commands.judges import (JUDGES, Judge, JudgeOptions, Pair, build_judge, check_judge_data, is_correct,
                                       pairwise_summary)
from fastdadpo.core.batch import pad_token_id, padded
from fastdadpo.core.chat import Message
from fastdadpo.core.rows import Example, load_prompts, strict_json
from fastdadpo.core.tokenized import STRING_ROWS, prompt_token_ids, sequence_token_ids
from fastdadpo.kernels import fused_linear_divergence
from fastdadpo.models.generation import generate_texts
from fastdadpo.models.loading import (count_parameters, final_hidden_states, head_logit_options, head_rows, head_weight,
                                      load_causal_lm, load_tokenizer, release_memory, require_model_dir, resolve_device,
                                      resolve_dtype)
from fastdadpo.models.vocabulary import check_tokenizers_compatible
DIVERGENCE_KINDS = ("forward_kl", "reverse_kl")


# --- examples ----------------------------------------------------------------------------------------------

def conversation_text(messages: Sequence[Message]) -> str:
    """A conversation as plain text, for judges and answer matching."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def correctness(responses: Sequence[str], examples: Sequence[Example]) -> List[Optional[bool]]:
    """Per row: the response matches the row's answer (None for a row without one)."""
    return [is_correct(r, e.answer) if e.answer is not None else None for r, e in zip(responses, examples)]


def accuracy(responses: Sequence[str], examples: Sequence[Example]) -> Optional[float]:
    """Exact-match accuracy over the rows with an answer (None when no row has one)."""
    return _mean_of_known(correctness(responses, examples))


def _mean_of_known(flags: Sequence[Optional[bool]]) -> Optional[float]:
    known = [flag for flag in flags if flag is not None]
    return sum(known) / len(known) if known else None


# --- the teacher's pass and the students' ------------------------------------------------------------------

@dataclass
class TeacherPass:
    """What the students are compared with, kept after the teacher is released."""
    tokenizer: object
    responses: List[str]
    sequences: List[Tuple[List[int], List[int]]]     # (prompt ids, response ids) of the teacher's responses
    hidden: List[torch.Tensor]                       # per row, on the CPU: [response tokens, hidden] predicting them
    head: torch.Tensor                               # the LM head, on the CPU
    logit_options: dict                              # its soft cap and logit scale (models.head_logit_options)
    parameters: int
    accuracy: Optional[float]

    @property
    def response_tokens(self) -> int:
        return sum(len(response) for _, response in self.sequences)


def _length_batches(sequences: Sequence[Tuple[List[int], List[int]]], batch_size: int) -> List[List[int]]:
    """Row indices in batches of similar total length (little padding)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _response_hidden_states(model, sequences, rows: Sequence[int], pad_id: int, device) -> List[torch.Tensor]:
    """Final hidden states at the positions that predict each response token, one tensor per row."""
    input_ids, attention_mask = padded([sequences[i][0] + sequences[i][1] for i in rows], pad_id)
    hidden = final_hidden_states(model, input_ids.to(device), attention_mask.to(device))
    spans = [(len(sequences[i][0]) - 1, len(sequences[i][0]) + len(sequences[i][1]) - 1) for i in rows]
    return [hidden[row, start:end] for row, (start, end) in enumerate(spans)]


def _generate(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
              device, name: str, string_rows: str = "template") -> List[str]:
    prompts = [prompt_token_ids(tokenizer, e, string_rows) for e in examples]
    return generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                          batch_size=batch_size, device=device, progress=f"eval {name}")


def teacher_pass(path: str, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
                 device: torch.device, dtype: torch.dtype, string_rows: str = "template") -> TeacherPass:
    """The teacher's responses (the rows' "chosen", else greedy), their tokens, and the teacher's
    final hidden states at them."""
    tokenizer = load_tokenizer(path, "--teacher")
    model = load_causal_lm(path, dtype=dtype, device=device, key="--teacher")
    missing = [e for e in examples if e.chosen is None]
    generated = iter(_generate(model, tokenizer, missing, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               device=device, name="teacher", string_rows=string_rows) if missing else [])
    # A generated response is kept as it came out, even when empty (as_messages would refuse that).
    responses = [e.chosen or [{"role": "assistant", "content": next(generated)}] for e in examples]
    sequences = []
    for example, response in zip(examples, responses):
        sequences.append(sequence_token_ids(tokenizer, example, response, string_rows))
    hidden: List[Optional[torch.Tensor]] = [None] * len(examples)
    with torch.inference_mode():
        for rows in _length_batches(sequences, batch_size):
            for row, states in zip(rows, _response_hidden_states(model, sequences, rows, pad_token_id(tokenizer),
                                                                 device)):
                hidden[row] = states.cpu()
    texts = [conversation_text(r) for r in responses]
    return TeacherPass(tokenizer=tokenizer, responses=texts, sequences=sequences, hidden=hidden,
                       head=head_weight(model).detach().cpu().clone(),
                       logit_options=head_logit_options(model.config, "--teacher"), parameters=count_parameters(model),
                       accuracy=accuracy(texts, examples))


def divergences(model, teacher: TeacherPass, *, vocab_size: int, batch_size: int,
                device: torch.device) -> Dict[str, object]:
    """Mean per-token forward and reverse KL between the teacher and ``model`` over the first
    ``vocab_size`` rows of their heads, at the response tokens of the teacher's responses (pooled),
    and each row's sum (``row_forward_kl``, ``row_reverse_kl``)."""
    row_sums = {kind: [0.0] * len(teacher.sequences) for kind in DIVERGENCE_KINDS}
    tokens = 0
    teacher_head, student_head = teacher.head.to(device), head_weight(model)
    options = dict(**head_logit_options(model.config, "student"),
                   **{f"teacher_{name}": value for name, value in teacher.logit_options.items()})
    pad_id = pad_token_id(teacher.tokenizer)
    with torch.inference_mode():
        for rows in _length_batches(teacher.sequences, batch_size):
            student_hidden = torch.cat(_response_hidden_states(model, teacher.sequences, rows, pad_id, device))
            if not len(student_hidden):
                continue
            teacher_hidden = torch.cat([teacher.hidden[row] for row in rows]).to(device)
            lengths = [len(teacher.hidden[row]) for row in rows]
            for kind in DIVERGENCE_KINDS:
                per_token = fused_linear_divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                                                    kind=kind, vocab_size=vocab_size, **options)
                for row, part in zip(rows, per_token.double().split(lengths)):
                    row_sums[kind][row] = float(part.sum())
            tokens += len(student_hidden)
    means = {kind: (sum(row_sums[kind]) / tokens if tokens else None) for kind in DIVERGENCE_KINDS}
    return {**means, **{f"row_{kind}": row_sums[kind] for kind in DIVERGENCE_KINDS}}


def student_pass(name: str, path: str, examples: Sequence[Example], teacher: TeacherPass, *,
                 max_new_tokens: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                 string_rows: str = "template") -> dict:
    """One student's row: its greedy responses, their accuracy, its divergence to the teacher."""
    key = f"student {name!r}"
    tokenizer = load_tokenizer(path, key)
    model = load_causal_lm(path, dtype=dtype, device=device, key=key)
    vocab_size = check_tokenizers_compatible(tokenizer, teacher.tokenizer, student_head_rows=head_rows(model),
                                             teacher_head_rows=teacher.head.shape[0])
    responses = _generate(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          device=device, name=name, string_rows=string_rows)
    correct = correctness(responses, examples)
    return {"path": path, "parameters": count_parameters(model), "accuracy": _mean_of_known(correct),
            **divergences(model, teacher, vocab_size=vocab_size, batch_size=batch_size, device=device),
            "correct": correct, "responses": responses}


# --- evaluating several students against one teacher -------------------------------------------------------

def evaluate_models(teacher_dir: str, students: Mapping[str, str], examples: Sequence[Example], *,
                    judge: Union[str, Judge] = "exact", max_new_tokens: int = 128, batch_size: int = 8,
                    device: Optional[Union[str, torch.device]] = None, dtype: Optional[str] = None,
                    teacher_name: str = "teacher", group_by: Optional[str] = None,
                    string_rows: str = "template") -> dict:
    """Evaluate every student (display name -> model directory) against the teacher on ``examples``
    (``data.load_prompts(path)``), sharing the teacher's responses and hidden states. Returns
    ``{"teacher", "judge", "examples", "answered", "response_tokens", "max_new_tokens", "models"}``,
    ``models`` mapping display names to rows, the teacher's first (accuracy; divergence 0; no pairwise
    fields), then one per student: ``path, parameters, accuracy, forward_kl, reverse_kl, wins, losses,
    ties, win_rate, loss_rate, tie_rate, preference_rate, outcomes, correct, row_forward_kl,
    row_reverse_kl, responses``; ``row_tokens`` gives each prompt's teacher response tokens. With
    ``group_by`` (a field every row has), ``groups`` maps each of its values to the same summaries
    over that group's rows (``group_summaries``)."""
    if not examples:
        raise DataError("no examples to evaluate on")
    groups = group_labels(examples, group_by) if group_by else None
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
                           dtype=torch_dtype, string_rows=string_rows)
    release_memory()
    rows = {teacher_name: {"path": teacher_dir, "parameters": teacher.parameters, "accuracy": teacher.accuracy,
                           "forward_kl": 0.0, "reverse_kl": 0.0, "correct": correctness(teacher.responses, examples),
                           "responses": teacher.responses}}
    for name, path in students.items():
        rows[name] = student_pass(name, path, examples, teacher, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, device=device, dtype=torch_dtype, string_rows=string_rows)
        release_memory()
    questions = [conversation_text(e.prompt) for e in examples]
    try:
        for name in students:
            outcomes = judge.judge([Pair(q, e.answer, t, s) for q, e, t, s in
                                    zip(questions, examples, teacher.responses, rows[name]["responses"])])
            rows[name].update(pairwise_summary(outcomes), outcomes=outcomes)
    finally:
        judge.close()
    results = {"teacher": teacher_dir, "judge": judge.describe(), "examples": len(examples),
               "answered": sum(e.answer is not None for e in examples), "response_tokens": teacher.response_tokens,
               "row_tokens": [len(response) for _, response in teacher.sequences],
               "max_new_tokens": max_new_tokens, "models": rows}
    if groups is not None:
        results.update(group_by=group_by, groups=group_summaries(results, groups))
    return results


def group_labels(examples: Sequence[Example], field: str) -> List[str]:
    """Each row's value of ``field`` (as text), which every row must have."""
    labels = []
    for example in examples:
        value = example.extra.get(field)
        if value is None or isinstance(value, (dict, list)):
            raise DataError(f"{example.source}: --group-by {field}: the row has no {field!r} field holding a "
                            f"string or number (every row needs one to be grouped)")
        labels.append(str(value))
    return labels


def subset_summary(results: dict, name: str, members: Sequence[int]) -> dict:
    """One model's accuracy, forward and reverse KL (pooled over the response tokens of the rows
    ``members``) and the pairwise summary of its outcomes there."""
    row = results["models"][name]
    tokens = sum(results["row_tokens"][i] for i in members)
    summary = {"accuracy": _mean_of_known([row["correct"][i] for i in members])}
    for kind in DIVERGENCE_KINDS:
        per_row = row.get(f"row_{kind}")  # the teacher has none: its divergence is 0 everywhere
        summary[kind] = (row[kind] if per_row is None else
                         sum(per_row[i] for i in members) / tokens if tokens else None)
    if "outcomes" in row:
        summary.update(pairwise_summary([row["outcomes"][i] for i in members]))
    return summary


def group_summaries(results: dict, labels: Sequence[str]) -> Dict[str, dict]:
    """Per group label: its prompt count and response tokens, and every model's ``subset_summary``."""
    summaries = {}
    for label in dict.fromkeys(labels):
        members = [i for i, value in enumerate(labels) if value == label]
        summaries[label] = {"examples": len(members),
                            "response_tokens": sum(results["row_tokens"][i] for i in members),
                            "models": {name: subset_summary(results, name, members) for name in results["models"]}}
    return summaries


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


def text_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    """Lines of a plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths)))

    return [line(header), line(["-" * w for w in widths])] + [line(cells) for cells in body]


def format_table(results: dict) -> str:
    """The results as a plain-text table: one row per model, the teacher first; then, when grouped,
    one table of the per-group accuracy, preference rate and forward KL."""
    header = ["model"] + [title for title, _ in TABLE_COLUMNS]
    body = [[name] + [_cell(key, row.get(key)) for _, key in TABLE_COLUMNS] for name, row in results["models"].items()]
    judge = results["judge"]["name"]
    footer = (f"{results['examples']} prompts ({results['answered']} with answers), judge: {judge}, divergence over "
              f"{results['response_tokens']} teacher response tokens; pref = (wins - losses) / pairs")
    lines = text_table(header, body) + [footer]
    if results.get("groups"):
        lines += ["", f"by {results['group_by']}: accuracy / pref / KL(t||s)"]
        labels = list(results["groups"])
        group_body = [[name] + ["/".join(_cell(key, results["groups"][label]["models"][name].get(key))
                                         for key in ("accuracy", "preference_rate", "forward_kl"))
                                for label in labels] for name in results["models"]]
        lines += text_table(["model"] + [f"{label} ({results['groups'][label]['examples']})" for label in labels],
                            group_body)
    return "\n".join(lines)


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
    parser.add_argument("--judge-allow-http", action="store_true",
                        help="http judge: allow plain http:// to a host other than this machine (the prompts and "
                             "the API key then cross the network unencrypted)")
    parser.add_argument("--judge-workers", type=int, default=8, help="http judge: requests in flight")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="longest response generated per prompt (greedy), for the teacher and every student")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="prompts generated and scored together (more: faster, more memory)")
    parser.add_argument("--limit", type=int, help="evaluate on the first N rows only")
    parser.add_argument("--group-by", metavar="FIELD",
                        help="also summarize per value of this row field (e.g. a task family); every row needs it")
    parser.add_argument("--out", help="write the results (with every response) to this JSON file")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--string-rows", choices=STRING_ROWS, default="template",
                        help="plain-string prompts: through the chat template, or raw text (as trained with)")


def _students(args) -> Dict[str, str]:
    """Display name -> model directory, from --students and --student."""
    students = {}
    if args.students:
        try:
            with open(args.students, encoding="utf-8") as handle:
                # The data rows' reader: duplicate keys, NaN, deep nesting and lone surrogates refused.
                students = strict_json(handle.read(), f"--students: {args.students}")
        except OSError as exc:
            raise ConfigError(f"--students: cannot read {args.students}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--students: {args.students} is not UTF-8 text") from None
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
    if not math.isfinite(args.judge_timeout) or args.judge_timeout <= 0:
        raise ConfigError(f"--judge-timeout: must be a positive number of seconds, got {args.judge_timeout:g}")
    if args.out:  # checked before the evaluation runs, not after it, when its results would be lost
        check_writable(args.out, "--out")
    device = resolve_device(args.device)
    judge = build_judge(args.judge, JudgeOptions(model=args.judge_model, url=args.judge_url,
                                                 api_key_env=args.judge_api_key_env, timeout=args.judge_timeout,
                                                 allow_http=args.judge_allow_http,
                                                 workers=args.judge_workers, batch_size=args.batch_size,
                                                 device=device, dtype=args.dtype))
    examples = load_prompts(args.data)[:args.limit]
    results = evaluate_models(args.teacher, _students(args), examples, judge=judge,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, device=device,
                              dtype=args.dtype, group_by=args.group_by, string_rows=args.string_rows)
    print(format_table(results))
    if args.out:
        _write_results(args.out, json.dumps(results, indent=2))
    note = judge.check_replies()  # after the results are written: nothing is lost when it fails the run
    if note:
        print(f"note: {note}")
    return 0


def _write_results(out: str, text: str) -> None:
    """``--out`` (checked before the evaluation, but a disk can fill meanwhile): on failure the
    results go to a file in the temporary directory instead, named in the error, not lost."""
    try:
        write_text_atomic(out, text)
    except OSError as exc:
        fallback = os.path.join(tempfile.gettempdir(), f"fastdadpo-eval-{os.getpid()}.json")
        try:
            write_text_atomic(fallback, text)
            kept = f"they are in {fallback} instead"
        except OSError:
            kept = "nor could they be written to the temporary directory (the table above has the summary)"
        raise UserError(f"--out: writing the results to {out} failed ({exc.strerror or exc}); {kept}") from None
