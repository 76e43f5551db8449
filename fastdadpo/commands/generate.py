"""``fastdadpo generate``: the daDPO preference set. For every prompt, the teacher's response is
``chosen`` and the student's ``rejected``; each output row is ``{"index", "prompt", "chosen",
"rejected"}`` plus the prompt row's ``answer`` and other fields. ``index`` is the prompt's row in
the prompts file (the output's own ``index`` wins over a prompt field of that name).

``--keep-chosen`` (ADPA's pairs): every prompt row carries its own ``chosen`` response (e.g. a
preference dataset's preferred one), which the output keeps as it is; the teacher is neither loaded
nor run (``--teacher`` is refused with it, so that no output looks as if a teacher had made it) and
only the student samples ``rejected``. ADPA's released code takes the student's greedy output
(``--temperature 0``); the temperature given is used as given. A row's input ``rejected`` is dropped.

Determinism. The prompts are sorted by length and cut into fixed batches of ``--batch-size``
(batch k is the same whatever the number of ranks or how often the run was interrupted); batch k
of model m is sampled with a seed derived from (``--seed``, k, m). So the same command gives the
same file, and a resumed run writes exactly what an uninterrupted one would. Each model samples
from its own distribution: its ``generation_config.json`` (repetition penalties, default top-k,
...) is replaced by the flags here; LM-head rows past the tokenizer's vocabulary are never sampled.

Resumption. Rows are appended as each step finishes (flushed and fsynced), in batch order; a
rerun reads the output, drops a trailing partial line left by a kill, and generates only the
batches with missing rows. When every row is there the file is rewritten sorted by ``index``
(atomically). ``OUT.settings.json`` records the settings, with a fingerprint of each model's config
and weights; a rerun with other settings, or other weights at the same path, is refused rather than
mixing two samplings in one file. Every kept row is checked (an in-range ``index``, string
``chosen`` and ``rejected``, the prompt of its index): a row this command did not write is an error
naming its line, never trusted.

Served models (``--teacher-url``, ``--student-url``: an OpenAI-compatible server per model, e.g.
vLLM): one process sends every row's request at once, ``--concurrency`` in flight per server, and
writes the rows batch by batch as they arrive, with the same resumption and checks; the settings
record what each server serves (``models.served``), so other weights behind the URL are refused.

Several processes (``torchrun --nproc_per_node=N -m fastdadpo generate ...``): both models are
sharded with ZeRO-3, each step gives every rank one batch (a rank with none left generates a
dummy batch whose output is dropped, so all ranks make the same collective calls), and rank 0
gathers and writes the rows.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from fastdadpo.base import collectives
from fastdadpo.base.errors import ConfigError, DataError, UserError
from fastdadpo.base.workers import DaemonPool, Failures
from fastdadpo.base.files import check_writable
from fastdadpo.base.progress import StageProgress
from fastdadpo.core.batch import pad_token_id
from fastdadpo.core.rows import Example, load_prompts
from fastdadpo.core.tokenized import STRING_ROWS, prompt_token_ids
from fastdadpo.engine.registry import default_engine
from fastdadpo.models import loading as models
from fastdadpo.models.fingerprint import model_fingerprint
from fastdadpo.commands import generate_output as output
from fastdadpo.commands.generate_output import ROLES
from fastdadpo.models.generation import decode_response, generate_batch
from fastdadpo.models.served import ServedModel, ServerSettings
from fastdadpo.models.vocabulary import check_tokenizers_compatible

SERVER_FLAGS = {"timeout": "--request-timeout", "backoff": "--retry-backoff"}  # ServerSettings' fields as flags: --NAME, but for these


def server_flag(name: str) -> str:
    """The flag that sets ServerSettings' field ``name``."""
    return SERVER_FLAGS.get(name, "--" + name.replace("_", "-"))
KEPT_CHOSEN_ROLES = ("student",)  # --keep-chosen: the chosen responses come with the prompts
# The CLI's help formatter appends "(default: X)" to every flag; this (an empty rendering of the
# default) stops it where "None" would say nothing.
NO_DEFAULT_SHOWN = "%(default).0s"


def add_arguments(parser) -> None:
    parser.epilog = ("Rerunning the same command continues a partial --out (rows are written as they finish) and "
                     "leaves a finished one alone; OUT.settings.json records the settings, and other settings are "
                     "refused. The same command writes the same file, whether resumed or not, on any number of "
                     "processes. Several processes: torchrun --nproc_per_node=N -m fastdadpo generate ... (both "
                     "models sharded with DeepSpeed ZeRO-3).")
    parser.add_argument("--teacher", default=None, metavar="DIR", help=(
        "teacher model directory (Hugging Face format); its responses become 'chosen'. Required, except with "
        "--keep-chosen, which refuses it" + NO_DEFAULT_SHOWN))
    parser.add_argument("--keep-chosen", action="store_true", help=(
        "keep each prompt row's own 'chosen' response (every row must have one) and sample only the student's "
        "'rejected'; the teacher is not used (ADPA's pairs: its released code samples the student greedily, "
        "--temperature 0)"))
    parser.add_argument("--student", required=True, metavar="DIR", help=(
        "student model directory; its responses become 'rejected'. Its tokenizer must map every token to the "
        "same id as the teacher's" + NO_DEFAULT_SHOWN))
    parser.add_argument("--prompts", required=True, metavar="FILE", help=(
        "prompts: .jsonl, .json, .parquet or a saved dataset directory (DIR or DIR:split), one row per prompt with "
        "a 'prompt' field (a string or chat messages); other fields (e.g. 'answer') are copied to the output"
        + NO_DEFAULT_SHOWN))
    parser.add_argument("--out", required=True, metavar="FILE", help=(
        "output JSONL file; an existing partial output is continued, a finished one left as is" + NO_DEFAULT_SHOWN))
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                        help="most tokens generated per response")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="sampling temperature; 0 means greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling: sample from the smallest token set of probability >= P (1: all)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seed of the sampling; with the same seed and settings the output is the same")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="prompts per generation batch (per rank); part of what the samples depend on")
    parser.add_argument("--max-prompt-length", type=int, default=None, metavar="N", help=(
        "keep only the last N tokens of a longer prompt (default: keep it whole)" + NO_DEFAULT_SHOWN))
    parser.add_argument("--string-rows", choices=STRING_ROWS, default="template", help=(
        "plain-string prompts: through the chat template, or raw text (TRL's standard format; train with the same "
        "data.string_rows)"))
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help=(
        "weights' dtype (default: bf16 on GPU, fp32 on CPU)" + NO_DEFAULT_SHOWN))
    parser.add_argument("--timeout-minutes", type=float, default=30.0, metavar="M", help=(
        "several processes: how long a rank waits for the others in a collective before the run ends with one "
        "paragraph naming the lost rank (train.timeout_minutes for training)"))
    served = parser.add_argument_group("served models (an OpenAI-compatible server per model: vLLM, SGLang, TGI)")
    for role in ROLES:
        served.add_argument(f"--{role}-url", default=None, metavar="URL", help=(
            f"sample the {role} through the server at URL (e.g. http://127.0.0.1:8000) instead of loading it; "
            f"--{role} then gives only its tokenizer and config (no weights needed)" + NO_DEFAULT_SHOWN))
        served.add_argument(f"--{role}-model-name", default=None, metavar="NAME", help=(
            f"the name the server serves the {role} under (default: its only model)" + NO_DEFAULT_SHOWN))
    served.add_argument("--concurrency", type=int, default=ServerSettings.concurrency, metavar="N",
                        help="requests in flight per server")
    served.add_argument("--request-timeout", type=float, default=ServerSettings.timeout, metavar="S",
                        help="seconds one request may take, whole; past it (or on HTTP 429/5xx) it is retried")
    served.add_argument("--retries", type=int, default=ServerSettings.retries, metavar="N",
                        help="retries of a request that timed out or got HTTP 429/5xx, with exponential backoff")
    served.add_argument("--retry-backoff", type=float, default=ServerSettings.backoff, metavar="S",
                        help="seconds before the first retry, doubled at each next one")
    served.add_argument("--api-key-env", default=None, metavar="VAR", help=(
        "environment variable holding the servers' API key (sent as a Bearer token, never printed); or put "
        "user:password in the URL" + NO_DEFAULT_SHOWN))
    served.add_argument("--allow-http", action="store_true",
                        help="allow plain http:// to a server on another machine (the prompts and key unencrypted)")


def run(args) -> int:
    check_arguments(args)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        info = default_engine().setup_distributed(args.timeout_minutes * 60) if several else _single_process()
        with collectives.peers_lost_reported(info, lambda: "while generating", lambda: (
                f"The rows finished so far are in {args.out}: run the same command again to continue")):
            _generate(args, info)
    finally:
        if several:
            collectives.teardown()
    return 0


def _single_process() -> collectives.DistInfo:
    """One process needs no process group and no DeepSpeed: plain models on the local device."""
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return collectives.DistInfo(rank=0, world_size=1, local_rank=0, device=device)


def check_arguments(args) -> None:
    problems = []
    if args.keep_chosen and args.teacher is not None:
        problems.append(f"--keep-chosen takes 'chosen' from the prompt rows and never runs a teacher, so --teacher "
                        f"{args.teacher} would be unused; drop one of the two")
    if not args.keep_chosen and args.teacher is None:
        problems.append("--teacher is required (its responses become 'chosen'), unless --keep-chosen takes them "
                        "from the prompt rows")
    if not math.isfinite(args.timeout_minutes) or args.timeout_minutes <= 0:
        problems.append(f"--timeout-minutes must be a positive number, got {args.timeout_minutes}")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        problems.append(f"--temperature must be 0 (greedy) or a positive finite number, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_prompt_length is not None and args.max_prompt_length < 1:
        problems.append(f"--max-prompt-length must be at least 1, got {args.max_prompt_length}")
    if args.keep_chosen and args.teacher_url:
        problems.append("--keep-chosen never runs a teacher, so --teacher-url would be unused")
    for role in ROLES:
        if getattr(args, f"{role}_model_name") and not getattr(args, f"{role}_url"):
            problems.append(f"--{role}-model-name names a served model: give --{role}-url too")
    if (args.teacher_url or args.student_url) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("a served model needs no torchrun: run one process, and --concurrency sets the requests in "
                        "flight")
    server_settings(args).validate(lambda flag, problem: problems.append(f"{flag} {problem}"),
                                   server_flag)
    if problems:
        raise UserError("; ".join(problems))


@dataclass
class _Job:
    """Everything known before any model is loaded, identical on every rank."""
    roles: tuple  # the models that generate: ROLES, or KEPT_CHOSEN_ROLES with --keep-chosen
    examples: list[Example]
    tokenizers: dict  # role -> tokenizer
    head_rows: dict  # role -> LM-head rows
    vocab_size: int
    prompts: dict  # role -> token ids of every prompt
    batches: list[list[int]]
    dtype: object
    settings: dict
    servers: dict  # role -> ServedModel, for the roles sampled through a server


def _generate(args, info: collectives.DistInfo) -> None:
    log = functools.partial(print, flush=True) if info.is_main else (lambda *_: None)
    if info.is_main:
        check_writable(args.out, "--out")
    job = _prepare(args, info, log)
    done = _rows_done(args.out, job, info)
    pending = [batch_id for batch_id, batch in enumerate(job.batches) if any(i not in done for i in batch)]
    if not pending:
        if info.is_main:
            output.finish(args.out, len(job.examples))
        log(f"generate: nothing to do, all {len(job.examples)} rows are already in {args.out}")
        return
    log(f"generate: {len(job.examples)} prompts, {len(done)} already in {args.out}; {len(pending)} batches of up "
        f"to {args.batch_size} to generate on {info.world_size} process(es)")
    loaded = {role: job.servers.get(role) or _load_model(getattr(args, role), f"--{role}", job.tokenizers[role],
                                                         job.vocab_size, job.head_rows[role], job.dtype, info)
              for role in job.roles}
    started = time.monotonic()
    empty_responses, new_rows = _run_steps(args, job, loaded, pending, done, info)
    collectives.barrier()
    if info.is_main:
        output.finish(args.out, len(job.examples))
        seconds = time.monotonic() - started
        log(f"generate: done, {len(job.examples)} rows in {args.out} ({new_rows} new in {seconds:.1f} s, "
            f"{new_rows / max(seconds, 1e-9):.2f} rows/s)")
        if empty_responses:
            print(f"fastdadpo generate: warning: {empty_responses} new rows have an empty response (the model "
                  f"stopped at once); training drops rows with an empty teacher (chosen) response and keeps empty "
                  f"student (rejected) responses as rejected examples",
                  file=sys.stderr)


def _prepare(args, info: collectives.DistInfo, log) -> _Job:
    """Read and check every input (fast failures before any model is loaded) and plan the batches."""
    roles = KEPT_CHOSEN_ROLES if args.keep_chosen else ROLES
    examples = load_prompts(args.prompts)
    if args.keep_chosen:
        _check_kept_chosen(examples)
    tokenizers = {role: _load_tokenizer(getattr(args, role), f"--{role}") for role in roles}
    head_rows = {role: _head_rows(getattr(args, role), f"--{role}") for role in roles}
    # Without a teacher the student is checked against itself: its head must cover its tokenizer.
    other = "teacher" if "teacher" in roles else "student"
    try:
        vocab_size = check_tokenizers_compatible(tokenizers["student"], tokenizers[other],
                                                 student_head_rows=head_rows["student"],
                                                 teacher_head_rows=head_rows[other])
    except ConfigError as exc:
        models_given = f"--teacher {args.teacher} and --student {args.student}" if other == "teacher" \
            else f"--student {args.student}"
        raise UserError(f"{models_given}: {exc}") from None
    prompts = {}
    for role in roles:
        prompts[role], truncated = _prompt_ids(tokenizers[role], examples, args.max_prompt_length, args.string_rows)
        if truncated:
            log(f"generate: {truncated} prompts cut to their last {args.max_prompt_length} tokens "
                f"(--max-prompt-length) for the {role}")
    if any("index" in example.extra for example in examples):
        log("generate: the prompts have a field 'index'; the output's 'index' (the prompt's row) replaces it")
    dtype = models.resolve_dtype(args.dtype, info.device)
    servers, identities = _connect(args, roles, tokenizers, log)
    return _Job(roles, examples, tokenizers, head_rows, vocab_size, prompts,
                batches=plan_batches([len(ids) for ids in prompts["student"]], args.batch_size), dtype=dtype,
                settings=_settings(args, examples, str(dtype).removeprefix("torch."), identities), servers=servers)


def server_settings(args) -> ServerSettings:
    return ServerSettings(api_key_env=args.api_key_env, allow_http=args.allow_http, timeout=args.request_timeout,
                          retries=args.retries, backoff=args.retry_backoff, concurrency=args.concurrency)


def _connect(args, roles, tokenizers: dict, log) -> tuple[dict, dict]:
    """role -> ServedModel for each role given a URL: reached, its name settled and its tokenizer
    compared with the local one before any row is asked for; and "ROLE_server" -> its identity
    (``ServedModel.identity``), which the settings record."""
    servers, identities = {}, {}
    for role in roles:
        url = getattr(args, f"{role}_url")
        if url:
            servers[role] = ServedModel(url, flag=f"--{role}-url", settings=server_settings(args), role=role,
                                        name=getattr(args, f"{role}_model_name"), setting_flag=server_flag)
            note = servers[role].check_tokenizer(tokenizers[role])
            if note:
                log(f"generate: {note}")
            identities[f"{role}_server"] = servers[role].identity(tokenizers[role])
            log(f"generate: the {role} is served at {servers[role].server.display} as {servers[role].name!r}")
    return servers, identities


def _rows_done(out: str, job: _Job, info: collectives.DistInfo) -> set[int]:
    """Indices already in the output. Only rank 0 reads it; its verdict (or its error) goes to
    every rank, so no rank is left waiting for one that failed."""
    verdict = None
    if info.is_main:
        try:
            verdict = (None, output.prepare_output(out, job.settings, job.examples))
        except UserError as exc:
            verdict = (str(exc), None)
    error, done = collectives.broadcast_object(verdict)
    if error is not None:
        raise UserError(error)
    return done


def _run_steps(args, job: _Job, loaded: dict, pending: list[int], done: set[int], info) -> tuple[int, int]:
    """Generate the pending batches, ``world_size`` at a time; rank 0 appends each step's rows.
    Returns how many rows were written and how many of them have an empty response."""
    if job.servers:
        return _run_served(args, job, loaded, pending, done, info)
    empty_responses, new_rows = 0, 0
    steps = -(-len(pending) // info.world_size)
    rows_pending = sum(len([i for i in job.batches[b] if i not in done]) for b in pending)
    with open(args.out, "a", encoding="utf-8") if info.is_main else contextlib.nullcontext() as out, \
            StageProgress(rows_pending, "generate", "rows", active=info.is_main) as progress:
        for step in range(steps):
            slot = step * info.world_size + info.rank
            batch_id = pending[slot] if slot < len(pending) else None
            # A rank without a batch of its own generates a dummy one: all ranks must step together.
            indices = job.batches[batch_id] if batch_id is not None else job.batches[pending[0]][:1]
            texts = {role: _responses(loaded[role], job.tokenizers[role], [job.prompts[role][i] for i in indices],
                                      args, seed=_batch_seed(args.seed, -1 if batch_id is None else batch_id, role),
                                      info=info)
                     for role in job.roles}
            rows = [] if batch_id is None else [
                output.output_row(job.examples[i], i, rejected=texts["student"][k],
                           chosen=texts["teacher"][k] if "teacher" in texts else output.kept_chosen(job.examples[i]))
                for k, i in enumerate(indices) if i not in done]
            gathered = [row for part in collectives.gather_to_main(rows) for row in part]
            if info.is_main:
                output.append_rows(out, gathered)
                # A kept chosen was checked non-empty: only generated responses can be.
                empty_responses += sum(1 for row in gathered if not row["rejected"] or not row["chosen"])
                new_rows += len(gathered)
                progress.update(len(gathered), step=f"{step + 1}/{steps}")
    return empty_responses, new_rows


def _run_served(args, job: _Job, loaded: dict, pending: list[int], done: set[int], info) -> tuple[int, int]:
    """One process, at least one model served. Every pending row's request goes to its server's
    queue at once (``--concurrency`` in flight per server) while a model loaded here samples its
    batches as in-process generation does; rows are written batch by batch, in order, as their
    responses arrive. A served row is seeded from (``--seed``, its index, its role), so it does not
    depend on the batches."""
    rows = [i for batch_id in pending for i in job.batches[batch_id] if i not in done]
    empty_responses = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(args.out, "a", encoding="utf-8"))
        progress = stack.enter_context(StageProgress(len(rows), "generate", "rows"))
        replies, failures = {}, Failures()
        for role, served in job.servers.items():
            pool = DaemonPool(args.concurrency, failures)
            # On a failure the requests not yet sent are dropped, and those in flight not waited for.
            stack.callback(pool.shutdown)
            for i in rows:
                replies[role, i] = pool.submit(
                    served.complete, job.prompts[role][i], max_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=_row_seed(args.seed, i, role))
        for step, batch_id in enumerate(pending):
            indices = job.batches[batch_id]
            texts = {role: _responses(loaded[role], job.tokenizers[role], [job.prompts[role][i] for i in indices],
                                      args, seed=_batch_seed(args.seed, batch_id, role), info=info)
                     for role in job.roles if role not in job.servers}
            texts.update({role: [failures.result(replies[role, i]) if i not in done else "" for i in indices]
                          for role in job.servers})
            written = [output.output_row(job.examples[i], i, rejected=texts["student"][k],
                                         chosen=texts["teacher"][k] if "teacher" in texts
                                         else output.kept_chosen(job.examples[i]))
                       for k, i in enumerate(indices) if i not in done]
            output.append_rows(out, written)
            empty_responses += sum(1 for row in written if not row["rejected"] or not row["chosen"])
            progress.update(len(written), step=f"{step + 1}/{len(pending)}")
    return empty_responses, len(rows)


def _row_seed(seed: int, index: int, role: str) -> int:
    digest = hashlib.sha256(f"{seed}/row {index}/{role}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31  # a 32-bit seed: what every server takes


# --- inputs --------------------------------------------------------------------------------------------------

def _load_tokenizer(path: str, flag: str):
    tokenizer = models.load_tokenizer(path, flag)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{flag} {path}: the tokenizer has no eos token, so a response could never end")
    return tokenizer


def _check_kept_chosen(examples: Sequence[Example]) -> None:
    """--keep-chosen: every row has one non-empty response of its own in ``chosen``."""
    for example in examples:
        problem = None
        if example.chosen is None:
            problem = "has no 'chosen' field"
        elif len(example.chosen) != 1:
            problem = f"has a 'chosen' of {len(example.chosen)} messages, not one response"
        elif not example.chosen[0]["content"].strip():
            problem = "has an empty 'chosen'"
        if problem:
            raise DataError(f"{example.source}: the row {problem}; --keep-chosen keeps each row's own chosen "
                            f"response (a string, or one assistant message) and samples only the student's "
                            f"rejected one, so every row needs one; add it, or drop --keep-chosen and give "
                            f"--teacher to sample the chosen responses")


def _head_rows(path: str, flag: str) -> int:
    """LM-head rows from the model's config, known before (and without) loading the weights."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path).get_text_config().vocab_size)
    except Exception as exc:  # noqa: BLE001 (see loading_failure)
        raise models.loading_failure(flag, path, "the model config", exc) from None


def _prompt_ids(tokenizer, examples: Sequence[Example], max_prompt_length: Optional[int], string_rows: str
                ) -> tuple[list[list[int]], int]:
    """Every prompt through the chat template, cut from the left to ``max_prompt_length``; and how many were cut."""
    prompts, truncated = [], 0
    for example in examples:
        ids = prompt_token_ids(tokenizer, example, string_rows)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids, truncated = ids[-max_prompt_length:], truncated + 1
        prompts.append(list(ids))
    return prompts, truncated


def plan_batches(prompt_lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices in batches: sorted by length (little padding; ties by index), cut every
    ``batch_size``. The plan depends only on the prompts, never on ranks or earlier runs."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _batch_seed(seed: int, batch_id: int, role: str) -> int:
    digest = hashlib.sha256(f"{seed}/{batch_id}/{role}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _settings(args, examples: Sequence[Example], dtype: str, identities: dict) -> dict:
    """What the rows depend on; a resumed run must match it. The models count by their path and by a
    fingerprint of their config and weights: other weights at the same path sample otherwise."""
    digest = hashlib.sha256()
    for example in examples:
        # Kept chosen responses are part of the output; otherwise a row's chosen is not read at all
        # (and the digest stays what outputs written before --keep-chosen recorded).
        row = [example.prompt, example.answer, example.extra] + ([example.chosen] if args.keep_chosen else [])
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    teacher = None if args.keep_chosen else args.teacher
    # A served model counts by what its server says it is (and how it answers a probe), not by files here.
    served = {key.removesuffix("_server") for key in identities}
    return {"teacher": teacher and os.path.realpath(teacher), "student": os.path.realpath(args.student),
            "teacher_weights": teacher and "teacher" not in served and model_fingerprint(teacher) or None,
            "student_weights": None if "student" in served else model_fingerprint(args.student), **identities,
            "keep_chosen": args.keep_chosen,
            "prompts_sha256": digest.hexdigest(), "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed, "batch_size": args.batch_size,
            "max_prompt_length": args.max_prompt_length, "dtype": dtype, "string_rows": args.string_rows}



# --- models --------------------------------------------------------------------------------------------------

def _load_model(path: str, flag: str, tokenizer, vocab_size: int, head_rows: int, dtype, info):
    """The model ready for ``generate``: plain on the device with one process, ZeRO-3-sharded with several."""
    from transformers import GenerationConfig

    model = default_engine().sampling_model(path, key=flag, dtype=dtype, device=info.device,
                                            world_size=info.world_size)
    # Sample from the model itself: no penalties or top-k from its generation_config.json, and
    # never a padded head row that no token of the tokenizer has.
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id(tokenizer),
        suppress_tokens=list(range(vocab_size, head_rows)) or None)
    return model


def _responses(model, tokenizer, prompts: list[list[int]], args, *, seed: int, info) -> list[str]:
    ids = generate_batch(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=seed, synced_gpus=info.world_size > 1, device=info.device)
    return [decode_response(tokenizer, response) for response in ids]


