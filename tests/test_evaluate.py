"""Evaluation against the teacher: the divergence metric against materialized logits (padded teacher
head included), evaluate_models end to end, the command line with JSON output, and bad input."""
import json
import subprocess
import sys

import pytest
import torch

from fastdadpo import cli
from fastdadpo.base.errors import ConfigError, DataError
from fastdadpo.commands.evaluate import divergences, evaluate_models, format_table, teacher_pass
from fastdadpo.commands.judges import ExactJudge, Pair
from fastdadpo.core.rows import load_prompts
from fastdadpo.demo.synthetic import ALL_TASKS, build_tokenizer, make_examples, save_model_dir, tiny_causal_lm

CPU = torch.device("cpu")
GOOD, BAD = "The last word is lake.", "I am not sure about that."


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def sharp_pair(tmp_path_factory, tokenizer):
    """A student and a teacher with peaked next-token distributions (scaled heads), the teacher's head
    padded with 64 rows whose huge logits would dominate if they were wrongly included."""
    directory = tmp_path_factory.mktemp("sharp")
    vocab = len(tokenizer)
    student = tiny_causal_lm(vocab, hidden_size=32, seed=21, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    teacher = tiny_causal_lm(vocab + 64, hidden_size=48, seed=22, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        student.lm_head.weight.mul_(12)
        teacher.lm_head.weight.mul_(12)
        teacher.lm_head.weight[vocab:] = 5.0
    return (save_model_dir(student, tokenizer, str(directory / "student")),
            save_model_dir(teacher, tokenizer, str(directory / "teacher")))


def _reference_divergences(student, teacher, sequences, vocab):
    """Pooled per-token KLs from materialized float64 logits over the first ``vocab`` rows."""
    forward = reverse = tokens = 0.0
    for prompt, response in sequences:
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            log_s = torch.log_softmax(student(input_ids=ids).logits[0, :, :vocab].double(), -1)
            log_t = torch.log_softmax(teacher(input_ids=ids).logits[0, :, :vocab].double(), -1)
        at = slice(len(prompt) - 1, len(prompt) + len(response) - 1)
        log_s, log_t = log_s[at], log_t[at]
        forward += float((log_t.exp() * (log_t - log_s)).sum())
        reverse += float((log_s.exp() * (log_s - log_t)).sum())
        tokens += len(response)
    return forward / tokens, reverse / tokens


def test_divergence_equals_materialized_reference_with_padded_teacher_head(tmp_path, tokenizer, sharp_pair):
    student_dir, teacher_dir = sharp_pair
    rows = make_examples(5, seed=11)
    for row in rows[:3]:   # given teacher responses; the other rows get the teacher's greedy ones
        row["chosen"] = row["answer"]
    examples = load_prompts(_write_rows(tmp_path / "rows.jsonl", rows))
    teacher = teacher_pass(teacher_dir, examples, max_new_tokens=6, batch_size=2, device=CPU, dtype=torch.float32)
    assert teacher.responses[:3] == [row["answer"] for row in rows[:3]]
    student = _load(student_dir)
    got = divergences(student, teacher, vocab_size=len(tokenizer), batch_size=2, device=CPU)
    forward, reverse = _reference_divergences(student, _load(teacher_dir), teacher.sequences, len(tokenizer))
    assert forward > 0.1 and reverse > 0.1
    assert got["forward_kl"] == pytest.approx(forward, rel=1e-4)
    assert got["reverse_kl"] == pytest.approx(reverse, rel=1e-4)


def test_evaluate_models_end_to_end_with_exact_judge(tmp_path, tokenizer, student_dir, teacher_dir, llama_dir):
    rows = make_examples(6, seed=13)
    for row in rows[:3]:
        row["chosen"] = row["answer"]   # the teacher is right on these, and (almost surely) wrong elsewhere
    examples = load_prompts(_write_rows(tmp_path / "rows.jsonl", rows))
    results = evaluate_models(teacher_dir, {"qwen student": student_dir, "llama student": llama_dir}, examples,
                              judge="exact", max_new_tokens=5, batch_size=4, device="cpu")
    assert list(results["models"]) == ["teacher", "qwen student", "llama student"]
    teacher, *students = results["models"].values()
    assert teacher["accuracy"] == 0.5 and teacher["forward_kl"] == 0.0 and "win_rate" not in teacher
    assert results["examples"] == results["answered"] == 6 and results["response_tokens"] > 0
    for row in students:
        correct = [r.strip().lower() == e["answer"].lower() for r, e in zip(row["responses"], rows)]
        assert row["accuracy"] == sum(correct) / 6
        assert row["outcomes"] == ExactJudge().judge([Pair("", e["answer"], t, s) for e, t, s in
                                                      zip(rows, teacher["responses"], row["responses"])])
        assert row["wins"] + row["losses"] + row["ties"] == 6
        assert row["preference_rate"] == pytest.approx((row["wins"] - row["losses"]) / 6)
        assert row["losses"] >= 3 - sum(correct[:3]) and row["forward_kl"] > 0 and row["reverse_kl"] > 0
    table = format_table(results)
    assert "llama student" in table and "pref" in table and "-50.0%" in table


def test_grouped_evaluation_with_lists_of_right_answers(tmp_path, student_dir, teacher_dir):
    """Rows with several right answers: a teacher response that is any one of them counts as right;
    the per-group summaries are the overall ones restricted to each group's rows, and the per-row
    divergence sums pool back to the overall means."""
    rows = make_examples(8, seed=3, tasks=ALL_TASKS)
    for index, row in enumerate(rows):
        row["answer"] = row.pop("answers")
        if index % 2 == 0:   # the teacher gives the last right answer (not the one drawn) on these
            row["chosen"] = row["answer"][-1]
    examples = load_prompts(_write_rows(tmp_path / "rows.jsonl", rows))
    assert any(isinstance(e.answer, tuple) and len(e.answer) > 1 for e in examples)
    results = evaluate_models(teacher_dir, {"s": student_dir}, examples, judge="exact", max_new_tokens=4,
                              batch_size=3, device="cpu", group_by="task")
    teacher, student = results["models"]["teacher"], results["models"]["s"]
    assert teacher["correct"][::2] == [True] * 4
    tokens = results["row_tokens"]
    assert sum(tokens) == results["response_tokens"]
    for kind in ("forward_kl", "reverse_kl"):
        assert sum(student[f"row_{kind}"]) / sum(tokens) == pytest.approx(student[kind], rel=1e-9)
    labels = [row["task"] for row in rows]
    assert set(results["groups"]) == set(labels) and results["group_by"] == "task"
    for label, group in results["groups"].items():
        members = [i for i, value in enumerate(labels) if value == label]
        assert group["examples"] == len(members)
        summary = group["models"]["s"]
        assert summary["accuracy"] == sum(student["correct"][i] for i in members) / len(members)
        assert summary["forward_kl"] == pytest.approx(sum(student["row_forward_kl"][i] for i in members) /
                                                      sum(tokens[i] for i in members))
        outcomes = [student["outcomes"][i] for i in members]
        assert summary["preference_rate"] == pytest.approx((outcomes.count("win") - outcomes.count("loss")) /
                                                           len(members))
        assert group["models"]["teacher"]["forward_kl"] == 0.0
    assert "by task: accuracy / pref / KL(t||s)" in format_table(results)
    with pytest.raises(DataError, match=r"line 1: --group-by family: the row has no 'family' field"):
        evaluate_models(teacher_dir, {"s": student_dir}, examples, device="cpu", group_by="family")


def test_evaluate_models_rejects_bad_input(tmp_path, tokenizer, student_dir, teacher_dir):
    unanswered = load_prompts(_write_rows(tmp_path / "open.jsonl", [{"prompt": "Tell me a story."}]))
    with pytest.raises(DataError, match="exact judge needs a reference 'answer'.*line 1"):
        evaluate_models(teacher_dir, {"s": student_dir}, unanswered, judge="exact", device="cpu")
    answered = load_prompts(_write_rows(tmp_path / "rows.jsonl", make_examples(2, seed=1)))
    with pytest.raises(ConfigError, match="--teacher"):
        evaluate_models(str(tmp_path / "nowhere"), {"s": student_dir}, answered, device="cpu")
    other_tokenizer = build_tokenizer(["completely different words here"] * 20, vocab_size=300)
    stranger = save_model_dir(tiny_causal_lm(len(other_tokenizer), hidden_size=32, pad_token_id=0, eos_token_id=1),
                              other_tokenizer, str(tmp_path / "stranger"))
    with pytest.raises(ConfigError, match="tokenizers differ"):
        evaluate_models(teacher_dir, {"s": stranger}, answered, max_new_tokens=2, device="cpu")


def test_cli_end_to_end_writes_json(tmp_path, student_dir, teacher_dir):
    data = _write_rows(tmp_path / "eval.jsonl", make_examples(5, seed=17))
    students = tmp_path / "students.json"
    students.write_text(json.dumps({"after dSFT": student_dir}))
    out = tmp_path / "results" / "eval.json"
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "eval", "--students", str(students), "--teacher",
                             teacher_dir, "--data", data, "--limit", "3", "--max-new-tokens", "4", "--out", str(out),
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "KL(t||s)" in result.stdout and "after dSFT" in result.stdout and "judge: exact" in result.stdout
    results = json.loads(out.read_text())
    assert results["examples"] == 3 and list(results["models"]) == ["teacher", "after dSFT"]
    student = results["models"]["after dSFT"]
    assert student["path"] == student_dir and len(student["responses"]) == 3 and "preference_rate" in student


def test_cli_bad_input_is_one_paragraph_without_traceback(tmp_path, student_dir, teacher_dir):
    data = _write_rows(tmp_path / "bad.jsonl", [{"prompt": "Count the words: red", "answer": "one"},
                                                {"question": "no prompt here"}])
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "eval", "--student", student_dir, "--teacher",
                             teacher_dir, "--data", data], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("fastdadpo: error:") and "line 2" in result.stderr and "prompt" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["unknown_judge", "no_answers", "missing_student", "http_without_url",
                                  "bad_students_file", "no_students"])
def test_cli_bad_input(case, tmp_path, student_dir, teacher_dir, capsys):
    rows = [{"prompt": "Tell me a story."}] if case == "no_answers" else make_examples(2, seed=3)
    data = _write_rows(tmp_path / "rows.jsonl", rows)
    student = str(tmp_path / "missing") if case == "missing_student" else student_dir
    (tmp_path / "students.json").write_text('{"a": "dir",\n "b": }')
    args = ["eval", "--student", student, "--teacher", teacher_dir, "--data", data, "--device", "cpu"]
    if case == "no_students":
        args = ["eval"] + args[3:]
    args += {"unknown_judge": ["--judge", "gpt4"], "http_without_url": ["--judge", "http"],
             "bad_students_file": ["--students", str(tmp_path / "students.json")]}.get(case, [])
    expected = {"unknown_judge": "unknown judge", "no_answers": "'answer'", "missing_student": "missing",
                "http_without_url": "--judge-url", "bad_students_file": "line 2",
                "no_students": "--students"}[case]
    assert cli.main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("fastdadpo: error:") and expected in stderr and "Traceback" not in stderr
