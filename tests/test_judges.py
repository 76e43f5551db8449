"""The judges: exact, model, http against a fake OpenAI-compatible server, both-order verdicts,
verdict parsing and configuration errors."""
import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.commands.judges import (Comparison, ExactJudge, HttpJudge, JudgeOptions, ModelJudge, Pair,
                                       PreferenceJudge, build_judge, chat_completions_url, combine_orders,
                                       judge_messages, pairwise_summary, parse_verdict)
from fastdadpo.core.chat import prompt_ids

CPU = torch.device("cpu")
GOOD, BAD = "The last word is lake.", "I am not sure about that."


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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


class _LocalServer:
    """A threaded HTTP server on 127.0.0.1, serving in the background; ``url`` is its address."""

    def _start(self, handler, server_class=ThreadingHTTPServer):
        self.httpd = server_class(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class FakeChatServer(_LocalServer):
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

        self._start(Handler, Server)


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
    assert judge.describe()["unparsed_replies"] == 2 and judge.describe()["asked"] == 2
    with pytest.raises(UserError, match="replies to 2 of 2 comparisons named no verdict"):
        judge.check_replies()  # every reply unreadable: the figures would be the default's
    some = chat_server(lambda content: None if "q1" in content else "A")  # "content": null for one prompt
    judge = HttpJudge(some.url, "m")
    judge.judge([Pair(f"q{i}", None, GOOD, BAD) for i in range(1, 5)])
    assert "replies to 2 of 8 comparisons" in judge.check_replies()


class TricklingServer(_LocalServer):
    """Sends a reply's headers, then its body one byte every ``pause`` seconds (or ``size`` bytes at once),
    or closes the connection mid-body with ``short``."""

    def __init__(self, pause=0.3, size=None, short=False):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps({"choices": [{"message": {"content": "A"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(size or len(body) + (100 if short else 0)))
                self.end_headers()
                try:
                    if size:
                        self.wfile.write(b" " * size)
                    elif short:
                        self.wfile.write(body)
                    else:
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(pause)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self._start(Handler)


def test_http_judge_bounds_the_whole_reply_in_time_and_size():
    servers = [TricklingServer(), TricklingServer(size=2 << 20), TricklingServer(short=True)]
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match="no reply within 1 s, 1 times"):
            HttpJudge(servers[0].url, "m", timeout=1.0, retries=0).ask(Comparison("q", "a", "b"))
        assert time.monotonic() - started < 5  # the socket timeout alone would wait for every byte (~20 s)
        with pytest.raises(UserError, match="a reply of more than 1,048,576 bytes"):
            HttpJudge(servers[1].url, "m", retries=0).ask(Comparison("q", "a", "b"))
        with pytest.raises(UserError, match="broke off its reply"):
            HttpJudge(servers[2].url, "m", retries=0, backoff=0.0).ask(Comparison("q", "a", "b"))
    finally:
        for server in servers:
            server.close()


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


# --- the http judge's transport: redirects, plain http, URLs, secrets, timeouts ----------------------------------

class _ScriptedServer(_LocalServer):
    """An HTTP server on 127.0.0.1 whose every POST is answered by ``respond(handler, body)``."""

    def __init__(self, respond):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append({"path": self.path, "headers": dict(self.headers)})
                respond(self, body)

            def log_message(self, *args):
                pass

        self._start(Handler)


@pytest.fixture
def scripted_server():
    servers = []

    def start(respond):
        servers.append(_ScriptedServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _send(handler, status, payload: bytes, headers=()):
    handler.send_response(status)
    for name, value in headers:
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def test_http_judge_follows_no_redirect_with_the_api_key(scripted_server, chat_server, monkeypatch):
    elsewhere = chat_server()  # another origin (port): it must never see the request or the key
    redirecting = scripted_server(lambda handler, body: _send(
        handler, 307, b"", [("Location", elsewhere.url + "/v1/chat/completions")]))
    monkeypatch.setenv("JUDGE_KEY", "sk-very-secret")
    judge = HttpJudge(redirecting.url, "m", api_key_env="JUDGE_KEY", backoff=0.0)
    with pytest.raises(UserError, match=r"redirect \(HTTP 307\).*not followed") as error:
        judge.ask(Comparison("q", "a", "b"))
    assert elsewhere.requests == [] and len(redirecting.requests) == 1
    assert "sk-very-secret" not in str(error.value) and elsewhere.url in str(error.value)


def test_http_judge_plain_http_only_to_this_machine(monkeypatch):
    with pytest.raises(ConfigError, match="plain http to another machine.*--judge-allow-http"):
        HttpJudge("http://judge.example.com:8000", "m")
    for url in ("https://judge.example.com", "http://localhost:8000", "http://127.0.0.2:1", "http://[::1]:8000"):
        HttpJudge(url, "m")
    judge = build_judge("http", _judge_options(url="http://judge.example.com:8000", model="m", allow_http=True))
    assert judge.endpoint == "http://judge.example.com:8000/v1/chat/completions"


def test_http_judge_urls_with_query_strings_and_credentials(scripted_server):
    assert chat_completions_url("https://h/api?version=2") == "https://h/api/v1/chat/completions?version=2"
    assert chat_completions_url("https://h/v1/?x=1#top") == "https://h/v1/chat/completions?x=1"
    assert chat_completions_url("HTTPS://h/openai/chat/completions?k=v") == "https://h/openai/chat/completions?k=v"
    # A server that echoes the credentials it got: they must not reach the message either.
    echo = scripted_server(lambda handler, body: _send(
        handler, 401, json.dumps({"error": handler.headers["Authorization"]}).encode()))
    url = echo.url.replace("http://", "http://alice:s3cr3t-pass@") + "/v1?api-version=7&key=k-123456"
    judge = HttpJudge(url, "m")
    assert "s3cr3t" not in json.dumps(judge.describe()) and "k-123456" not in json.dumps(judge.describe())
    with pytest.raises(UserError, match="HTTP 401") as error:
        judge.ask(Comparison("q", "a", "b"))
    (request,) = echo.requests
    assert request["path"] == "/v1/chat/completions?api-version=7&key=k-123456"
    token = request["headers"]["Authorization"].removeprefix("Basic ")
    assert base64.b64decode(token) == b"alice:s3cr3t-pass"
    for secret in ("s3cr3t-pass", token, "k-123456"):
        assert secret not in str(error.value)


def test_http_judge_timeout_must_be_positive(capsys, tmp_path):
    for timeout in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--judge-timeout: must be a positive number"):
            HttpJudge("http://127.0.0.1:9", "m", timeout=timeout)
    from fastdadpo.cli import main

    assert main(["eval", "--teacher", str(tmp_path), "--student", str(tmp_path), "--data", str(tmp_path / "x.jsonl"),
                 "--judge", "http", "--judge-url", "http://127.0.0.1:9", "--judge-model", "m",
                 "--judge-timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--judge-timeout: must be a positive number of seconds, got -1" in err and "Traceback" not in err


def test_a_garbage_status_line_is_shown_escaped_never_sent_to_the_terminal():
    """A server answering a status line of control bytes (an ANSI escape that would recolour or
    clear the user's terminal): one paragraph, the bytes escaped, after the configured retries."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(10)

    def answer_garbage():
        for _ in range(2):  # the request and its one retry
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"\x1b[2J\x1b[31mHELLO\x07 garbage\r\n\r\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        with pytest.raises(UserError) as error:
            HttpJudge(f"http://127.0.0.1:{listener.getsockname()[1]}", "m", retries=1, backoff=0.0).ask(
                Comparison("q", "a", "b"))
    finally:
        listener.close()
        thread.join(10)
    message = str(error.value)
    assert "broke off its reply" in message and "\\x1b[31mHELLO\\x07" in message, message
    assert not any(ord(char) < 32 for char in message), message
