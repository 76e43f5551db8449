"""Served models against a local OpenAI-compatible server (``bench/openai_server.py``, loopback, tiny
Hugging Face models): generation through a server equals in-process generation row for row, served
log-probs equal the in-process precompute, a killed run resumes without redoing a row, retries of
429/5xx/timeouts, a changed model behind the URL refused, and every error one paragraph, exit 2."""
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from bench.openai_server import LoopbackOpenAIServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def _env(**extra):
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def _run(*args, env=None, check=True):
    result = subprocess.run([sys.executable, "-m", "fastdadpo", *args], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env or _env(), cwd=REPO)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


def _one_paragraph(result, *phrases):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    said = " ".join(result.stderr.split())  # the paragraph as one line (the CLI wraps it)
    for phrase in phrases:
        assert phrase in said, result.stderr[-3000:]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer, student_dir, teacher_dir):
    """The tiny teacher (padded head) and student, the teacher's tokenizer and config without its
    weights, prompts, a preference set, and one server per model."""
    from fastdadpo.demo.synthetic import WORDS, make_examples

    root = tmp_path_factory.mktemp("served")
    tokenizer_only = root / "teacher-tokenizer"
    tokenizer_only.mkdir()
    for path in glob.glob(os.path.join(teacher_dir, "*")):
        if not path.endswith(".safetensors"):
            shutil.copy(path, tokenizer_only)
    examples = make_examples(14, seed=5, tasks=("repeat", "first"))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": e["prompt"], "answer": e["answer"]}) + "\n" for e in examples))
    rng = random.Random(0)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": e["prompt"], "chosen": e["answer"],
                                         "rejected": " ".join(rng.sample(WORDS, 3))}) + "\n" for e in examples))
    servers = {"teacher": LoopbackOpenAIServer({"teacher-7b": teacher_dir}),
               "student": LoopbackOpenAIServer({"student-1b": student_dir})}
    yield dict(root=root, teacher=teacher_dir, student=student_dir, teacher_tokenizer=str(tokenizer_only),
               prompts=str(prompts), pairs=str(pairs), servers=servers)
    for server in servers.values():
        server.close()


def _generate_args(world, out, *extra, greedy=True):
    return ["generate", "--teacher", world["teacher"], "--student", world["student"], "--prompts", world["prompts"],
            "--out", str(out), "--max-new-tokens", "10", "--batch-size", "4",
            *(["--temperature", "0"] if greedy else []), *extra]


def _served(world, *roles):
    return [arg for role in roles for arg in (f"--{role}-url", world["servers"][role].url)]


@pytest.fixture(scope="module")
def in_process(world):
    out = world["root"] / "in-process.jsonl"
    _run(*_generate_args(world, out))
    return out.read_text()


def test_served_greedy_generation_equals_in_process_row_for_row(world, in_process, tmp_path):
    both = tmp_path / "both.jsonl"
    result = _run(*_generate_args(world, both, *_served(world, "teacher", "student"), "--concurrency", "8"))
    assert both.read_text() == in_process
    assert "rows/s" in result.stdout and "served at" in result.stdout
    settings = json.loads((tmp_path / "both.jsonl.settings.json").read_text())
    assert settings["teacher_server"]["id"] == "teacher-7b" and settings["teacher_server"]["root"] == world["teacher"]
    assert settings["teacher_weights"] is None and len(settings["teacher_server"]["probe"]) == 16
    # Every completion carried the exact token ids and the full sampling settings, not the model's defaults.
    bodies = [r["body"] for r in world["servers"]["student"].requests if r["path"] == "/v1/completions"]
    sampled = [b for b in bodies if "prompt_logprobs" not in b and b["max_tokens"] == 10]
    assert len(sampled) == 14 and all(isinstance(b["prompt"], list) and b["top_k"] == -1
                                      and b["repetition_penalty"] == 1.0 and b["temperature"] == 0 for b in sampled)
    # A served teacher beside an in-process student; --teacher then needs no weights.
    mixed = tmp_path / "mixed.jsonl"
    args = _generate_args(world, mixed, *_served(world, "teacher"))
    args[args.index("--teacher") + 1] = world["teacher_tokenizer"]
    _run(*args)
    assert [json.loads(line)["chosen"] for line in mixed.read_text().splitlines()] == \
        [json.loads(line)["chosen"] for line in in_process.splitlines()]


def test_served_sampling_is_seeded_per_row(world, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (first, second):
        _run(*_generate_args(world, out, *_served(world, "teacher", "student"), greedy=False))
    assert first.read_text() == second.read_text()
    seeds = [r["body"]["seed"] for r in world["servers"]["teacher"].requests
             if r["path"] == "/v1/completions" and r["body"].get("temperature") == 1.0]
    assert len(set(seeds)) == 14 and all(0 <= seed < 2**31 for seed in seeds)


def test_a_killed_served_run_continues_without_redoing_a_row(world, in_process, tmp_path):
    slow = LoopbackOpenAIServer({"teacher-7b": world["teacher"]}, latency=0.4)
    out = tmp_path / "killed.jsonl"
    try:
        args = _generate_args(world, out, "--teacher-url", slow.url, "--concurrency", "1")
        process = subprocess.Popen([sys.executable, "-m", "fastdadpo", *args], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=_env(), cwd=REPO)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 4):
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        written = {json.loads(line)["index"] for line in out.read_text().splitlines() if line.endswith("}")}
        assert 4 <= len(written) < 14
        before = len(slow.requests)
        _run(*args)
        asked = [r["body"]["prompt"] for r in slow.requests[before:]
                 if r["path"] == "/v1/completions" and r["body"].get("max_tokens") == 10]
        assert len(asked) == 14 - len(written)  # only the missing rows, each once
        assert out.read_text() == in_process
    finally:
        slow.close()


def test_busy_and_failing_servers_are_retried(world, in_process, tmp_path):
    flaky = LoopbackOpenAIServer({"teacher-7b": world["teacher"]})
    try:
        flaky.faults += [("status", 429), ("status", 503), ("close",), ("sleep", 2.5), ("status", 500)]
        out = tmp_path / "flaky.jsonl"
        _run(*_generate_args(world, out, "--teacher-url", flaky.url, "--concurrency", "1",
                             "--request-timeout", "1.5", "--retries", "5", "--retry-backoff", "0.05"))
        assert out.read_text() == in_process
        flaky.faults += [("status", 503)] * 3
        result = _run(*_generate_args(world, tmp_path / "gives-up.jsonl", "--teacher-url", flaky.url,
                                      "--retries", "1", "--retry-backoff", "0.05", "--concurrency", "1"), check=False)
        _one_paragraph(result, "answered HTTP 503", "2 times")
    finally:
        flaky.close()


def test_a_changed_model_behind_the_url_is_refused_on_resume(world, student_dir, teacher_dir, tmp_path):
    server = LoopbackOpenAIServer({"teacher-7b": teacher_dir})
    try:
        out = tmp_path / "pairs.jsonl"
        args = _generate_args(world, out, "--teacher-url", server.url)
        _run(*args)
        assert "nothing to do" in _run(*args).stdout
        # Other weights under the same name and the same path: only the probe tells.
        other = tmp_path / "other-teacher"
        shutil.copytree(teacher_dir, other)
        from fastdadpo.demo.synthetic import save_model_dir, tiny_causal_lm
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(teacher_dir)
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        save_model_dir(tiny_causal_lm(config.vocab_size, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id, hidden_size=48, layers=2, seed=99),
                       tokenizer, str(other))
        server.serve("teacher-7b", str(other), root=teacher_dir)
        _one_paragraph(_run(*args, check=False), "generated with other settings", "teacher_server")
    finally:
        server.close()


def test_served_generation_errors_are_one_paragraph(world, tmp_path, tokenizer_dir):
    out = tmp_path / "out.jsonl"
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _one_paragraph(_run(*_generate_args(world, out, "--teacher-url", f"http://127.0.0.1:{port}"), check=False),
                   "connection refused")
    assert not out.exists()
    broken = LoopbackOpenAIServer({"teacher-7b": world["teacher"]})
    try:
        broken.faults += [("pass",), ("json", b"{not json")]  # the identity probe passes, a row's reply breaks
        _one_paragraph(_run(*_generate_args(world, out, "--teacher-url", broken.url, "--concurrency", "1"),
                            check=False), "not a JSON object")
        assert all(line.endswith("}") for line in out.read_text().splitlines())  # nothing written half
        _one_paragraph(_run(*_generate_args(world, tmp_path / "x.jsonl", "--teacher-url", broken.url,
                                            "--teacher-model-name", "llama-70b"), check=False),
                       "serves 'teacher-7b', not 'llama-70b'")
        # Another tokenizer behind the URL: its /tokenize splits the probe otherwise.
        from fastdadpo.demo.synthetic import build_tokenizer, save_model_dir, task_corpus, tiny_causal_lm

        other_tokenizer = build_tokenizer(task_corpus(300, seed=9), vocab_size=300)
        other = save_model_dir(tiny_causal_lm(len(other_tokenizer), hidden_size=32, layers=1),
                               other_tokenizer, str(tmp_path / "other"))
        broken.serve("teacher-7b", other)
        _one_paragraph(_run(*_generate_args(world, tmp_path / "y.jsonl", "--teacher-url", broken.url), check=False),
                       "another tokenizer")
    finally:
        broken.close()
    # The flags themselves.
    for extra, phrase in ((["--concurrency", "0"], "--concurrency must be a whole number"),
                          (["--teacher-model-name", "m"], "give --teacher-url too"),
                          (["--request-timeout", "nan"], "--request-timeout must be a positive number")):
        _one_paragraph(_run(*_generate_args(world, out, *extra), check=False), phrase)


def test_credentials_reach_only_the_server_and_no_output(world, tmp_path):
    server = LoopbackOpenAIServer({"teacher-7b": world["teacher"]})
    try:
        out = tmp_path / "keyed.jsonl"
        result = _run(*_generate_args(world, out, "--teacher-url", server.url, "--api-key-env", "SERVED_KEY"),
                      env=_env(SERVED_KEY="sk-served-secret"))
        assert {r["headers"].get("Authorization") for r in server.requests} == {"Bearer sk-served-secret"}
        written = out.read_text() + (tmp_path / "keyed.jsonl.settings.json").read_text()
        assert "sk-served-secret" not in written + result.stdout + result.stderr
        _one_paragraph(_run(*_generate_args(world, tmp_path / "z.jsonl", "--teacher-url", server.url,
                                            "--api-key-env", "NO_SUCH_KEY_SET"), check=False), "NO_SUCH_KEY_SET")
    finally:
        server.close()


# --- served log-probs for the cached tables ------------------------------------------------------------------

def _train_config(world, tmp_path, name, objective="dadpo", **model) -> str:
    config = {"model": {"student": world["student"], "teacher": world["teacher"], **model},
              "data": {"train": world["pairs"], "max_length": 64, "max_prompt_length": 40,
                       "cache_dir": str(tmp_path / f"cache-{name}")},
              "objective": {"name": objective},
              "train": {"micro_batch_size": 2, "max_steps": 2, "output_dir": str(tmp_path / f"run-{name}")},
              "deepspeed": {"zero_stage": 0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _tables(cache_dir) -> dict:
    """model (its fingerprint, or a served model's listing) -> its cached [rows, 2] table."""
    from safetensors import safe_open

    tables = {}
    for path in glob.glob(os.path.join(cache_dir, "logps", "*.safetensors")):
        with safe_open(path, "pt") as handle:
            model = json.loads(handle.metadata()["key"])["model"]
            tables[json.dumps(model, sort_keys=True)] = handle.get_tensor("table")
    return tables


def test_served_teacher_log_probs_equal_the_in_process_precompute(world, tmp_path):
    import torch

    from fastdadpo.models.fingerprint import model_fingerprint

    server = world["servers"]["teacher"]
    _run("train", _train_config(world, tmp_path, "local"), "--precompute-only")
    # The teacher given only as its tokenizer and config: the trainer never loads it.
    result = _run("train", _train_config(world, tmp_path, "served", teacher=world["teacher_tokenizer"],
                                         teacher_url=server.url), "--precompute-only")
    assert "the teacher is served at" in result.stdout
    local, served = _tables(tmp_path / "cache-local"), _tables(tmp_path / "cache-served")
    teacher_local = local[json.dumps(model_fingerprint(world["teacher"]))]
    (teacher_served,) = [table for key, table in served.items() if "teacher-7b" in key]
    assert teacher_served.shape == teacher_local.shape and bool((teacher_local != 0).all())
    torch.testing.assert_close(teacher_served, teacher_local, rtol=1e-5, atol=1e-5)
    # The prompt + response token ids the trainer trains on, one request per sequence.
    asked = [r["body"] for r in server.requests if "prompt_logprobs" in r.get("body", {})]
    assert len(asked) >= 2 * 14 and all(isinstance(body["prompt"], list) for body in asked)
    # A rerun takes the cache (no request); the served teacher then trains end to end.
    before = len(server.requests)
    _run("train", _train_config(world, tmp_path, "served", teacher=world["teacher_tokenizer"],
                                teacher_url=server.url))
    assert not [r for r in server.requests[before:] if "prompt_logprobs" in r.get("body", {})
                and len(r["body"]["prompt"]) > 17]


def test_a_served_reference_equals_the_loaded_one(world, tmp_path):
    """dpo's π_ref (``model.reference``) through a server, as the teacher's: the same table."""
    import torch

    from fastdadpo.models.fingerprint import model_fingerprint

    _run("train", _train_config(world, tmp_path, "ref-local", objective="dpo", reference=world["teacher"]),
         "--precompute-only")
    _run("train", _train_config(world, tmp_path, "ref-served", objective="dpo", reference=world["teacher_tokenizer"],
                                reference_url=world["servers"]["teacher"].url), "--precompute-only")
    local = _tables(tmp_path / "cache-ref-local")[json.dumps(model_fingerprint(world["teacher"]))]
    (served,) = [t for key, t in _tables(tmp_path / "cache-ref-served").items() if "teacher-7b" in key]
    torch.testing.assert_close(served, local, rtol=1e-5, atol=1e-5)


def test_a_server_without_log_probs_still_samples(world, in_process, tmp_path):
    """Sampling needs no prompt_logprobs (TGI, SGLang's OpenAI route): the identity probe is then a
    greedy continuation."""
    plain = LoopbackOpenAIServer({"teacher-7b": world["teacher"]}, logprobs=False, tokenize=False)
    try:
        out = tmp_path / "plain.jsonl"
        result = _run(*_generate_args(world, out, "--teacher-url", plain.url))
        assert out.read_text() == in_process
        assert "no /tokenize route" in result.stdout  # said, not checked
        assert isinstance(json.loads((tmp_path / "plain.jsonl.settings.json").read_text())["teacher_server"]["probe"],
                          str)
    finally:
        plain.close()


def test_served_log_prob_errors_are_one_paragraph(world, tmp_path):
    no_logprobs = LoopbackOpenAIServer({"teacher-7b": world["teacher"]}, logprobs=False)
    short = LoopbackOpenAIServer({"teacher-7b": world["teacher"]})
    try:
        _one_paragraph(_run("train", _train_config(world, tmp_path, "a", teacher_url=no_logprobs.url),
                            "--precompute-only", check=False), "returned no 'prompt_logprobs'", "vLLM")
        short.faults += [("pass",), ("short",)]  # the identity probe passes, the first sequence comes back short
        _one_paragraph(_run("train", _train_config(world, tmp_path, "b", teacher_url=short.url), "--precompute-only",
                            check=False), "returned log-probs for")
    finally:
        no_logprobs.close()
        short.close()
    # What a server cannot give: a teacher read every step; a setting nothing reads.
    url = world["servers"]["teacher"].url
    for objective, model, phrase in (("kd", {"teacher_url": url}, "whole next-token distribution"),
                                     ("sft", {"teacher_url": url}, "never uses the teacher"),
                                     ("dpo", {"reference_url": url}, "needs model.reference too"),
                                     ("dadpo", {"teacher_model_name": "x"}, "set model.teacher_url too")):
        result = _run("train", _train_config(world, tmp_path, objective, objective=objective, **model), check=False)
        _one_paragraph(result, phrase)


def test_plan_with_a_served_teacher_drops_its_memory(world, tmp_path):
    local = _run("plan", _train_config(world, tmp_path, "p1"), "--json")
    served = _run("plan", _train_config(world, tmp_path, "p2", teacher_url="https://vllm.example.com:8000"), "--json")
    local, served = json.loads(local.stdout), json.loads(served.stdout)
    text = _run("plan", _train_config(world, tmp_path, "p2", teacher_url="https://vllm.example.com:8000")).stdout
    assert "model.teacher (cached log-probs): served at https://vllm.example.com:8000" in text
    assert "teacher (precompute)" in json.dumps(local) and "teacher (precompute)" not in json.dumps(served)


def test_a_recipe_serves_the_teacher_only(tmp_path):
    from fastdadpo.base.errors import ConfigError
    from fastdadpo.commands.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    base = {"output_dir": "x", "teacher": "t", "student": "s", "prompts": "p"}
    path.write_text(yaml.safe_dump(dict(base, generate={"teacher_url": "http://127.0.0.1:8000", "concurrency": 32})))
    assert load_recipe(str(path)).generate["concurrency"] == 32
    path.write_text(yaml.safe_dump(dict(base, generate={"student_url": "http://127.0.0.1:8001"})))
    with pytest.raises(ConfigError, match="student_url would serve one model at every stage"):
        load_recipe(str(path))


def test_raw_string_prompts_reach_the_server_as_raw_text(world, tokenizer, tmp_path):
    """``--string-rows raw`` (TRL's standard format): the prompt's own tokens, no chat template."""
    server = LoopbackOpenAIServer({"teacher-7b": world["teacher"]})
    try:
        out = tmp_path / "raw.jsonl"
        _run(*_generate_args(world, out, "--teacher-url", server.url, "--string-rows", "raw"))
        sent = [r["body"]["prompt"] for r in server.requests if r.get("body", {}).get("max_tokens") == 10]
        prompts = [json.loads(line)["prompt"] for line in open(world["prompts"], encoding="utf-8")]
        assert sorted(sent) == sorted(tokenizer(p)["input_ids"] for p in prompts)
        assert json.loads((tmp_path / "raw.jsonl.settings.json").read_text())["string_rows"] == "raw"
        _one_paragraph(_run(*_generate_args(world, out, "--teacher-url", server.url), check=False),
                       "string_rows 'raw' -> 'template'")
    finally:
        server.close()


def test_messages_name_the_setting_where_the_user_sets_it():
    """The same client under train (config keys) and generate (flags): each refusal names the place
    the user can change it, never a flag that command does not have."""
    from fastdadpo.base.errors import ConfigError
    from fastdadpo.commands.generate import server_flag
    from fastdadpo.models.served import ServedModel, ServerSettings

    for extra, where in (({}, "model.server.allow_http"), ({"setting_flag": server_flag}, "--allow-http")):
        with pytest.raises(ConfigError) as error:  # refused before any request is sent
            ServedModel("http://10.0.0.5:8000", flag="model.teacher_url", settings=ServerSettings(), **extra)
        assert f"pass {where} if the network is trusted" in str(error.value), error.value
    with pytest.raises(ConfigError, match="model.server.timeout: must be a positive number"):
        ServedModel("http://127.0.0.1:9", flag="model.teacher_url", settings=ServerSettings(timeout=0))


def test_a_failure_ends_generate_at_once_with_requests_still_hanging(world, tmp_path):
    """One request refused (HTTP 400) while three others hang at the server: the command ends with
    its paragraph at once, neither waiting for the hung requests (their timeout is 120 s) nor sending
    the rows not yet asked for (the workers are daemon threads, abandoned at exit)."""
    hanging = LoopbackOpenAIServer({"teacher-7b": world["teacher"]})
    try:
        hanging.faults += [("pass",), ("status", 400)] + [("sleep", 45)] * 40  # the probe passes, then...
        started = time.monotonic()
        result = _run(*_generate_args(world, tmp_path / "out.jsonl", "--teacher-url", hanging.url, "--concurrency",
                                      "4", "--request-timeout", "120", "--retries", "0"), check=False)
        elapsed = time.monotonic() - started
        _one_paragraph(result, "answered HTTP 400")
        assert elapsed < 40, elapsed  # the hung requests (45 s) were not waited for
        completions = [r for r in hanging.requests if r["path"] == "/v1/completions"]
        assert len(completions) <= 1 + 4 + 4, len(completions)  # the probe, and at most a round or two in flight
    finally:
        hanging.faults.clear()
        hanging.close()
