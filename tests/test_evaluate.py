"""Evaluation against the teacher: the divergence metric against materialized logits (padded teacher
head included), each judge (exact, model, http against a fake OpenAI-compatible server), both-order
verdicts, evaluate_models end to end, the command line with JSON output, and bad input."""
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastdadpo import cli
from fastdadpo.chat import prompt_ids
from fastdadpo.data import load_prompts
from fastdadpo.errors import ConfigError, DataError, UserError
from fastdadpo.evaluate import (Comparison, ExactJudge, HttpJudge, ModelJudge, Pair, PreferenceJudge, build_judge,
                                chat_completions_url, combine_orders, divergences, evaluate_models, format_table,
                                judge_messages, pairwise_summary, parse_verdict, teacher_pass)
from fastdadpo.synthetic import build_tokenizer, make_examples, save_model_dir, tiny_causal_lm

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


def test_exact_judge_counts_wins_losses_and_ties():
    answer = "The first word is red."
    pairs = [Pair("q", answer, teacher="the first word is blue.", student="  The First word is RED. "),  # win
             Pair("q", answer, teacher=answer, student="red"),                                          # loss
             Pair("q", answer, teacher=answer, student=answer),                                         # tie
             Pair("q", answer, teacher="no", student="no"),                                             # tie
             Pair("q", answer, teacher="blue", student="the  first word is red.")]                      # win
    outcomes = ExactJudge().judge(pairs)
    assert outcomes == ["win", "loss", "tie", "tie", "win"]
    summary = pairwise_summary(outcomes)
    assert (summary["wins"], summary["losses"], summary["ties"]) == (2, 1, 2)
    assert summary["win_rate"] == 0.4 and summary["loss_rate"] == 0.2 and summary["tie_rate"] == 0.4
    assert summary["preference_rate"] == pytest.approx(0.2)


def test_verdicts_count_only_when_both_orders_agree():
    assert combine_orders("B", "A") == "win" and combine_orders("A", "B") == "loss"
    assert {combine_orders(a, b) for a, b in [("A", "A"), ("B", "B"), ("tie", "A"), ("B", "tie")]} == {"tie"}

    class Scripted(PreferenceJudge):
        def __init__(self, rule):
            self.rule, self.asked = rule, []

        def prefer(self, comparisons):
            self.asked += comparisons
            return [self.rule(c) for c in comparisons]

    pairs = [Pair("q1", None, teacher=GOOD, student=BAD), Pair("q2", None, teacher=BAD, student=GOOD)]
    fair = Scripted(lambda c: "A" if c.answer_a == GOOD else "B")
    assert fair.judge(pairs) == ["loss", "win"]
    assert {(c.question, c.answer_a, c.answer_b) for c in fair.asked} == {
        ("q1", GOOD, BAD), ("q1", BAD, GOOD), ("q2", BAD, GOOD), ("q2", GOOD, BAD)}
    assert Scripted(lambda c: "A").judge(pairs) == ["tie", "tie"]   # pure position bias cancels out


def test_model_judge_asks_both_orders(monkeypatch, student_dir):
    judge = build_judge("model", _judge_options(model=student_dir))
    asked = []

    def fake_score(comparisons):
        asked.extend((c.answer_a, c.answer_b) for c in comparisons)
        return [2.0 if c.answer_a == GOOD else -1.0 if c.answer_b == GOOD else 0.0 for c in comparisons]

    monkeypatch.setattr(judge, "score", fake_score)
    pairs = [Pair("q", None, teacher=GOOD, student=BAD), Pair("q", None, teacher=BAD, student=GOOD),
             Pair("q", None, teacher=BAD, student=BAD)]
    assert judge.judge(pairs) == ["loss", "win", "tie"]
    assert asked == [(GOOD, BAD), (BAD, GOOD), (BAD, BAD), (BAD, GOOD), (GOOD, BAD), (BAD, BAD)]


def _judge_options(**kwargs):
    from fastdadpo.evaluate import JudgeOptions

    return JudgeOptions(device=CPU, **kwargs)


def test_model_judge_reads_letter_probabilities_of_the_next_token(student_dir):
    from transformers import AutoTokenizer

    judge = ModelJudge(student_dir, device=CPU, batch_size=2)
    comparisons = [Comparison("Count the words: red", "There are one words.", "two"),
                   Comparison("What is the first word of: cat dog bird", GOOD, BAD),
                   Comparison("q", "same", "same")]
    scores = judge.score(comparisons)   # two batches, right-padded
    tokenizer, model = AutoTokenizer.from_pretrained(student_dir), _load(student_dir)
    letters = {letter: [ids[0] for text in (letter, " " + letter)
                        if len(ids := tokenizer.encode(text, add_special_tokens=False)) == 1] for letter in "AB"}
    for comparison, score in zip(comparisons, scores):
        ids = prompt_ids(tokenizer, judge_messages(comparison, ModelJudge.instruction))
        with torch.no_grad():
            log_p = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
        expected = log_p[letters["A"]].logsumexp(0) - log_p[letters["B"]].logsumexp(0)
        assert score == pytest.approx(float(expected), abs=1e-4)
    assert judge.prefer(comparisons) == ["A" if s > 0 else "B" if s < 0 else "tie" for s in scores]
    judge.close()


@pytest.mark.parametrize("reply, verdict", [
    ("A", "A"), (" b. ", "B"), ("Answer A", "A"), ("tie", "tie"), ("Tie.", "tie"), ("[[B]]", "B"),
    ("My verdict: [[C]]", "tie"), ("[[A]] because it is right", "A"), ("Answer B is better.", "B"),
    ("A better answer is B", None), ("I cannot decide", None), ("", None), ("It's a tie between A and B", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_chat_completions_url():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/api/chat/completions") == "https://h/api/chat/completions"
    with pytest.raises(ConfigError, match="--judge-url"):
        chat_completions_url("h:1")


class FakeChatServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that records requests; ``statuses`` are sent
    (with an error body) before normal replies; ``delay`` seconds pass before each answer."""

    def __init__(self, reply, statuses=(), delay=0.0):
        self.requests, self.reply, self.statuses, self.delay = [], reply, list(statuses), delay
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(server.delay)
                status = server.statuses.pop(0) if server.statuses else 200
                content = server.reply(body["messages"][-1]["content"])
                payload = {"choices": [{"message": {"role": "assistant", "content": content}}]} if status == 200 \
                    else {"error": {"message": "try later"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass   # a client that timed out closed the socket: expected in the timeout test

        self.httpd = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    servers = []

    def start(reply=lambda content: "A", **kwargs):
        servers.append(FakeChatServer(reply, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _prefers_good(content):
    """A fair judge: names the answer shown as GOOD, in two reply styles."""
    return "[[A]]" if content.index(GOOD) < content.index(BAD) else "Answer B is better."


def test_http_judge_sends_both_orders_and_parses_verdicts(chat_server, monkeypatch):
    server = chat_server(_prefers_good)
    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge = build_judge("http", _judge_options(url=server.url, model="judge-7b", api_key_env="JUDGE_KEY", workers=3))
    pairs = [Pair("q1", None, teacher=GOOD, student=BAD), Pair("q2", None, teacher=BAD, student=GOOD),
             Pair("q3", None, teacher=BAD, student=GOOD)]
    assert judge.judge(pairs) == ["loss", "win", "win"]
    assert len(server.requests) == 6
    shown_first = set()
    for request in server.requests:
        body = request["body"]
        assert request["path"] == "/v1/chat/completions" and request["headers"]["Authorization"] == "Bearer secret"
        assert body["model"] == "judge-7b" and body["temperature"] == 0 and body["max_tokens"] > 0
        content = body["messages"][-1]["content"]
        question = next(q for q in ("q1", "q2", "q3") if f"[Request]\n{q}\n" in content)
        shown_first.add((question, content.index(GOOD) < content.index(BAD)))
    assert shown_first == {(q, first) for q in ("q1", "q2", "q3") for first in (True, False)}
    assert judge.describe()["unparsed_replies"] == 0


def test_http_judge_unparsed_replies_are_ties_and_counted(chat_server):
    server = chat_server(lambda content: "Both have merits.")
    judge = HttpJudge(server.url + "/v1", "m")
    assert judge.judge([Pair("q", None, GOOD, BAD)]) == ["tie"]
    assert judge.describe()["unparsed_replies"] == 2


def test_http_judge_retries_busy_server(chat_server):
    server = chat_server(_prefers_good, statuses=[503, 429])
    judge = HttpJudge(server.url, "m", backoff=0.0, workers=1)
    assert judge.judge([Pair("q", None, teacher=BAD, student=GOOD)]) == ["win"]
    assert len(server.requests) == 4


def test_http_judge_errors_are_clear(chat_server):
    refused = chat_server(statuses=[401])
    with pytest.raises(UserError, match="HTTP 401"):
        HttpJudge(refused.url, "m", backoff=0.0).ask(Comparison("q", "a", "b"))
    slow = chat_server(delay=1.0)
    with pytest.raises(UserError, match="no reply within 0.2 s, 2 times"):
        HttpJudge(slow.url, "m", timeout=0.2, retries=1, backoff=0.0).ask(Comparison("q", "a", "b"))
    with socket.socket() as probe:   # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match=f"127.0.0.1:{port}/v1/chat/completions: connection refused"):
        HttpJudge(f"http://127.0.0.1:{port}", "m").judge([Pair("q", None, GOOD, BAD)])


def test_judge_configuration_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="unknown judge 'gpt'"):
        build_judge("gpt")
    with pytest.raises(ConfigError, match="--judge-model"):
        build_judge("model", _judge_options())
    with pytest.raises(ConfigError, match="--judge-model"):
        build_judge("model", _judge_options(model=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match="--judge-url"):
        build_judge("http", _judge_options(model="m"))
    with pytest.raises(ConfigError, match="NO_SUCH_KEY"):
        build_judge("http", _judge_options(url="http://127.0.0.1:9", model="m", api_key_env="NO_SUCH_KEY"))


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
