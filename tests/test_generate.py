"""`fastdadpo generate` end to end with tiny models: rows, greedy decoding against transformers'
own generate, seeded sampling, resumption after a kill, two ZeRO-3 ranks, and bad input."""
import json
import os
import signal
import subprocess
import sys

import pytest

from fastdadpo.cli import main
from fastdadpo.core import chat
from fastdadpo.core.rows import load_examples, load_prompts
from fastdadpo.models.generation import decode_response

MAX_NEW_TOKENS = 8
PROMPTS = [
    {"prompt": "Please repeat after me: red cat", "answer": "red cat", "task": "repeat"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count the words: sun"}],
     "answer": "There are one words."},
    {"prompt": "Which word comes last in: tree river stone cloud moon star", "answer": "The last word is star."},
    {"prompt": "Echo these words: dog"},
    {"prompt": "Reverse the order of: apple bread milk", "answer": "milk bread apple", "index": 99},
]


def env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return str(path)


def generate_command(teacher, student, prompts, out, *extra):
    return ["generate", "--teacher", teacher, "--student", student, "--prompts", prompts, "--out", str(out),
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2", *extra]


def run_cli(args, launcher=(sys.executable, "-m", "fastdadpo"), timeout=300):
    # A session of its own, so that a timeout ends the launcher's worker processes too.
    process = subprocess.Popen([*launcher, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def read_rows(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def greedy_output(teacher_dir, student_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("greedy") / "pairs.jsonl"
    result = run_cli(generate_command(teacher_dir, student_dir, prompts_file, out, "--temperature", "0"))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def sampled_output(teacher_dir, student_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampled") / "pairs.jsonl"
    result = run_cli(generate_command(teacher_dir, student_dir, prompts_file, out, "--seed", "3"))
    assert result.returncode == 0, result.stderr
    return out


def test_rows_are_preference_pairs_with_the_prompt_fields(greedy_output, prompts_file):
    rows = read_rows(greedy_output)
    assert [row["index"] for row in rows] == list(range(len(PROMPTS)))
    for row, prompt in zip(rows, PROMPTS):
        assert row["prompt"] == prompt["prompt"] and row.get("answer") == prompt.get("answer")
        assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
    assert rows[0]["task"] == "repeat" and rows[4]["index"] == 4  # the prompt's own 'index' gives way
    examples = load_examples(str(greedy_output))
    assert [e.prompt for e in examples] == [e.prompt for e in load_prompts(prompts_file)]


def reference_greedy(model_dir, prompt_messages):
    """transformers' own generate, one prompt at a time (no padding), never sampling a padded head row."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    padded_rows = list(range(len(tokenizer), model.config.vocab_size)) or None
    texts = []
    for messages in prompt_messages:
        ids = torch.tensor([chat.prompt_ids(tokenizer, messages)])
        with torch.no_grad():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=MAX_NEW_TOKENS, suppress_tokens=padded_rows,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = output[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id) + 1]
        texts.append(decode_response(tokenizer, new))
    return texts


def test_greedy_matches_transformers_generate(greedy_output, teacher_dir, student_dir, prompts_file):
    rows = read_rows(greedy_output)
    messages = [example.prompt for example in load_prompts(prompts_file)]
    assert [row["chosen"] for row in rows] == reference_greedy(teacher_dir, messages)
    assert [row["rejected"] for row in rows] == reference_greedy(student_dir, messages)


@pytest.mark.slow
def test_sampling_is_reproducible(sampled_output, greedy_output, teacher_dir, student_dir, prompts_file,
                                  tmp_path):
    again = tmp_path / "again.jsonl"
    result = run_cli(generate_command(teacher_dir, student_dir, prompts_file, again, "--seed", "3"))
    assert result.returncode == 0, result.stderr
    assert again.read_bytes() == sampled_output.read_bytes()
    sampled, greedy = read_rows(sampled_output), read_rows(greedy_output)
    assert [row["chosen"] for row in sampled] != [row["chosen"] for row in greedy]


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_file(sampled_output, teacher_dir, student_dir, prompts_file,
                                               tmp_path):
    rows = sampled_output.read_text().splitlines(keepends=True)
    assert len(rows) == len(PROMPTS)
    out = tmp_path / "pairs.jsonl"
    # What a kill leaves: rows appended out of index order, one batch partly written, half a line.
    out.write_text(rows[3] + rows[0] + rows[1][: len(rows[1]) // 2])
    (tmp_path / "pairs.jsonl.settings.json").write_bytes(
        (sampled_output.parent / "pairs.jsonl.settings.json").read_bytes())
    result = run_cli(generate_command(teacher_dir, student_dir, prompts_file, out, "--seed", "3"))
    assert result.returncode == 0, result.stderr
    assert "dropped a partial last line" in result.stderr and "2 already in" in result.stdout
    assert out.read_bytes() == sampled_output.read_bytes()

    finished = out.stat().st_mtime_ns
    result = run_cli(generate_command(teacher_dir, student_dir, prompts_file, out, "--seed", "3"))
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert out.stat().st_mtime_ns == finished and out.read_bytes() == sampled_output.read_bytes()

    result = run_cli(generate_command(teacher_dir, student_dir, prompts_file, out, "--seed", "4"))
    assert result.returncode == 2 and "seed3->4" in unwrapped(result.stderr) and "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(greedy_output, teacher_dir, student_dir, prompts_file,
                                                  tmp_path):
    out = tmp_path / "pairs.jsonl"  # 5 prompts in batches of 2: rank 1 generates a dummy batch in step 2
    result = run_cli(generate_command(teacher_dir, student_dir, prompts_file, out, "--temperature", "0"),
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "-m", "fastdadpo"), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    assert out.read_bytes() == greedy_output.read_bytes()


# --- bad input -----------------------------------------------------------------------------------------------

def write(path, text):
    path.write_text(text)
    return str(path)


def unwrapped(text):
    """Text without whitespace: the CLI wraps errors at 100 columns, also inside paths at a hyphen."""
    return "".join(text.split())


def expect_user_error(capsys, args, *fragments):
    assert main(args) == 2
    stderr = capsys.readouterr().err
    for fragment in fragments:
        assert unwrapped(fragment) in unwrapped(stderr), stderr
    assert "Traceback" not in stderr


def test_bad_prompt_files(capsys, tmp_path, teacher_dir, student_dir):
    out = tmp_path / "out.jsonl"
    missing = str(tmp_path / "nope.jsonl")
    expect_user_error(capsys, generate_command(teacher_dir, student_dir, missing, out),
                      f"{missing}: does not exist")
    malformed = write(tmp_path / "malformed.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    expect_user_error(capsys, generate_command(teacher_dir, student_dir, malformed, out),
                      f"{malformed} line 2: malformed JSON")
    no_prompt = write(tmp_path / "no_prompt.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"question": "c"}\n')
    expect_user_error(capsys, generate_command(teacher_dir, student_dir, no_prompt, out),
                      f"{no_prompt} line 3: missing field 'prompt'")
    assert not out.exists()


def test_bad_flags_and_models(capsys, tmp_path, tokenizer, teacher_dir, student_dir, prompts_file):
    from fastdadpo.demo.synthetic import save_model_dir, tiny_causal_lm

    out = tmp_path / "out.jsonl"
    expect_user_error(capsys, generate_command(teacher_dir, student_dir, prompts_file, out, "--top-p", "0"),
                      "--top-p must be in (0, 1], got 0.0")
    expect_user_error(capsys, generate_command(teacher_dir, str(tmp_path / "none"), prompts_file, out),
                      f"--student: {tmp_path / 'none'} does not exist")
    small_head = save_model_dir(tiny_causal_lm(len(tokenizer) - 8, hidden_size=16, layers=1, heads=2, kv_heads=1),
                                tokenizer, str(tmp_path / "small_head"))
    expect_user_error(capsys, generate_command(teacher_dir, small_head, prompts_file, out),
                      f"model.student: the LM head has {len(tokenizer) - 8} rows, fewer than the tokenizer's "
                      f"{len(tokenizer)} tokens")


def test_incompatible_tokenizers(capsys, tmp_path, teacher_dir, prompts_file):
    from fastdadpo.demo.synthetic import build_tokenizer, save_model_dir, task_corpus, tiny_causal_lm

    other = build_tokenizer(task_corpus(200, seed=9), vocab_size=300)
    model = tiny_causal_lm(len(other) + 8, hidden_size=16, layers=1, heads=2, kv_heads=1,
                           pad_token_id=other.pad_token_id, eos_token_id=other.eos_token_id)
    student = save_model_dir(model, other, str(tmp_path / "other_student"))
    result = run_cli(generate_command(teacher_dir, student, prompts_file, tmp_path / "out.jsonl"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for fragment in (f"--teacher {teacher_dir} and --student {student}", "the teacher and student tokenizers differ "
                     "(token"):
        assert unwrapped(fragment) in unwrapped(result.stderr), result.stderr


def test_a_foreign_output_file_is_not_continued(capsys, tmp_path, teacher_dir, student_dir, prompts_file):
    out = write(tmp_path / "out.jsonl", '{"index": 0}\n')
    expect_user_error(capsys, generate_command(teacher_dir, student_dir, prompts_file, out),
                      f"{out}: the file exists but {out}.settings.json")


# --- resuming only what this command wrote, with the same models ---------------------------------------------

def _continued_copy(greedy_output, tmp_path, edit):
    """A copy of the greedy output (and its settings) whose rows ``edit`` changes."""
    rows = read_rows(greedy_output)
    edit(rows)
    out = tmp_path / "pairs.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "pairs.jsonl.settings.json").write_bytes(
        (greedy_output.parent / "pairs.jsonl.settings.json").read_bytes())
    return out


@pytest.mark.parametrize("edit, fragment", [
    (lambda rows: rows[2].pop("chosen"), "line 3: 'chosen' must be strings"),
    (lambda rows: rows[1].update(rejected=7), "line 2: 'rejected' must be strings (a generated response), got int"),
    (lambda rows: rows[0].update(prompt="something else"), "line 1: its 'prompt' is not prompt 0 of --prompts"),
    (lambda rows: rows[4].update(index=True), "line 5: 'index' True is not a row"),
], ids=["no-chosen", "number", "other-prompt", "bool-index"])
def test_resume_refuses_rows_this_command_did_not_write(capsys, greedy_output, teacher_dir, student_dir,
                                                        prompts_file, tmp_path, edit, fragment):
    out = _continued_copy(greedy_output, tmp_path, edit)
    before = out.read_bytes()
    expect_user_error(capsys, generate_command(teacher_dir, student_dir, prompts_file, out, "--temperature", "0"),
                      f"{out} {fragment}")
    assert out.read_bytes() == before


def test_resume_refuses_other_weights_at_the_same_path(capsys, teacher_dir, student_dir, prompts_file, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    student = tmp_path / "student"
    shutil.copytree(student_dir, student)
    out = tmp_path / "pairs.jsonl"
    command = generate_command(teacher_dir, str(student), prompts_file, out, "--temperature", "0",
                               "--max-new-tokens", "2")
    assert main(command) == 0
    capsys.readouterr()
    finished = out.read_bytes()
    weights = load_file(str(student / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3  # a fine-tune, saved over the same directory
    save_file(weights, str(student / "model.safetensors"), metadata={"format": "pt"})
    expect_user_error(capsys, command, f"the student's config or weights at {os.path.realpath(student)} changed since")
    assert out.read_bytes() == finished


@pytest.mark.slow
def test_a_stopped_rank_ends_generate_with_one_paragraph_at_the_timeout(teacher_dir, student_dir, tmp_path):
    """Rank 1 SIGSTOPped mid-generation (a hung rank): rank 0 does not wait forever; at
    --timeout-minutes it ends with one paragraph naming the lost rank (no gloo traceback), and the
    rows written so far are whole and kept for a rerun to continue."""
    import time

    import psutil

    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Repeat: word{i} and more"}) + "\n" for i in range(400)))
    out = tmp_path / "pairs.jsonl"
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               f"--log-dir={logs}", "--redirects=3", "-m", "fastdadpo",
               *generate_command(teacher_dir, student_dir, str(prompts), out, "--timeout-minutes", "0.25")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                               start_new_session=True)
    victim = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.05)
        assert process.poll() is None, "generation ended before rank 1 could be stopped"
        victim = next(child for child in psutil.Process(process.pid).children(recursive=True)
                      if child.environ().get("RANK") == "1" and "fastdadpo" in " ".join(child.cmdline()))
        victim.suspend()
        stopped_at = time.time()
        rank0 = None
        while time.time() < stopped_at + 120:
            found = [p for p in logs.rglob("stderr.log") if p.parent.name == "0"]
            if found and "lost contact" in found[0].read_text():
                rank0 = found[0].read_text()
                break
            time.sleep(0.2)
        waited = time.time() - stopped_at
    finally:
        if victim is not None:
            victim.kill()
        process.communicate(timeout=120)
    assert rank0 is not None, "rank 0 never gave up on the stopped rank"
    assert 10 < waited < 90, waited  # the 15-second timeout, not the default 30 minutes
    text = " ".join(rank0.split())
    assert "lost contact with rank(s) 1 while generating" in text and "Traceback" not in rank0, rank0[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every written line is whole JSON
    assert 0 < len(rows) < 400
