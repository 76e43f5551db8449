"""Served generation (``fastdadpo generate --teacher-url/--student-url``) against in-process
generation: rows per second of the same greedy preference set, on the CPU.

The same prompts (``make_examples``), the same tiny teacher and student (the tests' shapes: Qwen2,
hidden 48 / 32, 2 layers, the teacher's head padded past the tokenizer), ``--temperature 0``:

* ``in-process``: both models loaded by the command, ``--batch-size 16``;
* ``served c=N``: both models served, each by its own ``bench/openai_server.py``
  ``LoopbackOpenAIServer`` (greedy requests that arrive within 5 ms batched together, up to 32, as
  vLLM batches them), ``--concurrency N`` (1, 8, 32) requests in flight per server;
* ``served c=N, +20 ms``: the same with a fixed 20 ms added to every completion at the server (a
  network hop). The model's work is then a minor part of a request, so these rows isolate what is
  ours, the client: with N requests in flight the rate should grow nearly N-fold until the server's
  batching (its window and its batch size) saturates.

Each server runs in its own process (``python bench/test_served_generate.py --serve ...``, started
once and given its latency over stdin), as a real server does: sharing this process, its generation
loop would compete for the GIL with the client's threads and with the other server. Each server gets
one torch thread (the machine's two cores, one per model; the in-process command gets both threads
and runs the models one after the other). The server's own speed is not ours to claim: the ratios
say what a user of this machine gets, and the +20 ms rows what the client's concurrency does.

Timed (pytest-benchmark): the whole command, ``fastdadpo.cli.main(["generate", ...])`` called in
this process with a fresh ``--out`` per round (so the timing includes loading the models, or
connecting to the servers and probing them, and writing the file). ``extra_info``:

* ``rows_per_s``: the generation itself, rows over the seconds spent in
  ``fastdadpo.commands.generate._run_steps``, median over the timed rounds: the figure to compare;
  ``rows_per_s_best`` over the fastest round (on a shared machine other jobs only ever slow a round
  down); ``command_rows_per_s`` over the whole command;
* ``cpu_ms_per_row``: CPU time of the generation per row, of this process (the client; in-process,
  the generation itself) and of each server process;
* ``server_mean_batch``: the mean number of requests each server generated together.

Every round's output must equal, byte for byte, the in-process output (greedy rows do not depend on
how they were batched), and each server must have generated exactly one response per row per round
(no retried request), so a benchmark that measures failures cannot pass.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import pytest

LATENCY_S = 0.02
CONCURRENCY = (1, 8, 32)
BATCH_SIZE = 16  # in-process --batch-size
SERVER_THREADS = 1  # torch threads per server process
FULL = dict(rows=64, max_new_tokens=16)
QUICK = dict(rows=16, max_new_tokens=4)
ROLES = ("teacher", "student")


@dataclass(frozen=True)
class Case:
    name: str
    concurrency: Optional[int]  # None: in-process
    latency: float = 0.0

    @property
    def id(self) -> str:
        if self.concurrency is None:
            return "in-process"
        return f"served-c{self.concurrency}" + (f"-latency{round(self.latency * 1000)}ms" if self.latency else "")


CASES = ([Case("in-process", None)] + [Case(f"served c={c}", c) for c in CONCURRENCY]
         + [Case(f"served c={c}, +{round(LATENCY_S * 1000)} ms", c, LATENCY_S) for c in CONCURRENCY])


# --- the world: tokenizer, models, prompts -----------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    """The tests' tiny teacher and student (tests/conftest.py) and the prompts file."""
    import torch
    from bench.settings import BenchSettings
    from fastdadpo.demo.synthetic import build_tokenizer, make_examples, save_model_dir, task_corpus, tiny_causal_lm

    if torch.cuda.is_available():
        pytest.skip("a CPU benchmark: the loopback servers generate on the CPU, in-process generation would use "
                    "the GPU (CUDA_VISIBLE_DEVICES= to run it)")
    size = QUICK if BenchSettings.of(request.config).quick else FULL
    root = tmp_path_factory.mktemp("served_generate")
    tokenizer = build_tokenizer(task_corpus(400, seed=0), vocab_size=320)
    shapes = {"student": dict(vocab_size=len(tokenizer), hidden_size=32, seed=1),
              "teacher": dict(vocab_size=len(tokenizer) + 64, hidden_size=48, seed=2)}
    dirs = {role: save_model_dir(tiny_causal_lm(layers=2, heads=4, kv_heads=2, pad_token_id=tokenizer.pad_token_id,
                                                 eos_token_id=tokenizer.eos_token_id, **shapes[role]),
                                 tokenizer, str(root / role))
            for role in ROLES}
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in make_examples(size["rows"], seed=5)),
                       encoding="utf-8")
    return dict(size, dirs=dirs, prompts=str(prompts), root=root)


def _argv(world: dict, out: str, extra: list) -> list:
    return ["generate", "--teacher", world["dirs"]["teacher"], "--student", world["dirs"]["student"],
            "--prompts", world["prompts"], "--out", out, "--temperature", "0",
            "--max-new-tokens", str(world["max_new_tokens"]), "--batch-size", str(BATCH_SIZE), *extra]


def _run_command(argv: list) -> None:
    from fastdadpo.cli import main

    assert main(argv) == 0, f"fastdadpo {' '.join(argv)} failed (its message is in the captured stderr)"


@pytest.fixture(scope="module")
def reference(world) -> str:
    """The in-process output, once, untimed: what every round of every case must write."""
    out = str(world["root"] / "reference.jsonl")
    _run_command(_argv(world, out, []))
    with open(out, encoding="utf-8") as handle:
        text = handle.read()
    assert len(text.splitlines()) == world["rows"], text[-2000:]
    return text


# --- servers, each in its own process ---------------------------------------------------------------------

class ServerProcess:
    """A ``LoopbackOpenAIServer`` serving one model in a child process, which ends when its stdin
    closes. ``set_latency`` changes the delay it adds to every completion; ``generated`` lists the
    sizes of the batches it generated since ``reset`` (the child appends one line per batch to a file)."""

    def __init__(self, name: str, path: str, folder) -> None:
        self.name, self.url = name, None
        self.batches, self.log = str(folder / f"{name}-batches.txt"), str(folder / f"{name}-server.log")
        with open(self.log, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", name, path, self.batches],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                env=dict(os.environ, OMP_NUM_THREADS=str(SERVER_THREADS)))

    def _answer(self, expected: str) -> str:
        line = self.process.stdout.readline().strip()
        if not line.startswith(expected):
            self.close()
            with open(self.log, encoding="utf-8") as log:
                raise RuntimeError(f"the {self.name} server said {line!r}, not {expected}...\n{log.read()[-3000:]}")
        return line

    def wait_ready(self) -> None:
        self.url = self._answer("http://")  # printed once the model is loaded and the server listens

    def set_latency(self, seconds: float) -> None:
        self.process.stdin.write(f"latency {seconds!r}\n")
        self.process.stdin.flush()
        self._answer("ok")

    def process_cpu(self) -> float:
        """CPU seconds the server process has used so far (user + system, all its threads)."""
        import psutil

        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def generated(self) -> list:
        with open(self.batches, encoding="utf-8") as handle:
            return [int(line) for line in handle if line.strip()]

    def reset(self) -> None:
        open(self.batches, "w").close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def servers(world):
    """``get(latency)``: {role: ServerProcess}, started on first use (both at once: each imports torch
    and loads its model), with that latency set; closed at the module's end."""
    pair: dict = {}

    def get(latency: float) -> dict:
        if not pair:
            pair.update({role: ServerProcess(role, world["dirs"][role], world["root"]) for role in ROLES})
            for server in pair.values():
                server.wait_ready()
        for server in pair.values():
            server.set_latency(latency)
        return pair

    yield get
    for server in pair.values():
        server.close()


def _serve(name: str, path: str, batches: str) -> None:
    """The child process: serve ``path`` as ``name``, print the URL, record each batch's size, take
    ``latency SECONDS`` lines on stdin (answered ``ok``) and end when stdin closes."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(SERVER_THREADS)
    from bench.openai_server import LoopbackOpenAIServer

    server = LoopbackOpenAIServer({name: path})
    generate = server._generate

    def counted(group):
        with open(batches, "a", encoding="utf-8") as handle:  # first: generate() releases the requests
            handle.write(f"{len(group)}\n")
        generate(group)

    server._generate = counted  # the batch loop calls it once per batch
    print(server.url, flush=True)
    for line in sys.stdin:
        command, _, value = line.partition(" ")
        if command == "latency":
            server.latency = float(value)  # read by each request as it arrives
            print("ok", flush=True)
        else:
            print(f"unknown command {line.strip()!r}", flush=True)
    server.close()


# --- the benchmark -----------------------------------------------------------------------------------------

_rates: dict = {}  # case id -> generation rows/s, for the ratios


@pytest.mark.cpu
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_served_generate(benchmark, case, world, reference, servers, tmp_path, monkeypatch, request):
    import torch
    from bench.settings import BenchSettings
    from fastdadpo.commands import generate as generate_command

    settings = BenchSettings.of(request.config)
    rows = world["rows"]

    pair = servers(case.latency) if case.concurrency is not None else {}
    phases: list = []  # per call of the command: wall and CPU seconds in _run_steps (the generation)
    run_steps = generate_command._run_steps

    def cpu_seconds() -> dict:
        """CPU seconds so far of this process (the client, or in-process generation) and of each server."""
        times = {role: server.process_cpu() for role, server in pair.items()}
        return dict(times, **{"client" if pair else "in_process": time.process_time()})

    def timed_run_steps(*args, **kwargs):
        cpu, started = cpu_seconds(), time.perf_counter()
        empty, written = run_steps(*args, **kwargs)
        wall, cpu_after = time.perf_counter() - started, cpu_seconds()
        phases.append(dict(wall=wall, cpu={key: cpu_after[key] - cpu[key] for key in cpu}))
        assert written == rows, f"wrote {written} rows, not {rows}"
        return empty, written

    monkeypatch.setattr(generate_command, "_run_steps", timed_run_steps)

    extra = [] if case.concurrency is None else [
        "--teacher-url", pair["teacher"].url, "--student-url", pair["student"].url,
        "--concurrency", str(case.concurrency)]
    calls: list = []  # per call: {"command_s": wall seconds, role: the sizes of the batches its server generated}
    outs: list = []

    def setup():
        out = str(tmp_path / f"round{len(outs)}.jsonl")
        outs.append(out)
        for server in pair.values():
            server.reset()
        return (_argv(world, out, extra),), {}

    def command(argv):
        started = time.perf_counter()
        _run_command(argv)
        calls.append({"command_s": time.perf_counter() - started})

    def teardown(argv):
        with open(argv[argv.index("--out") + 1], encoding="utf-8") as handle:
            assert handle.read() == reference, f"{case.name}: the rows differ from the in-process ones"
        for role, server in pair.items():
            sizes = server.generated()
            # One response per row, none retried; the identity probe takes prompt log-probs, no batch.
            assert sum(sizes) == rows, f"the {role} server generated {sum(sizes)} responses for {rows} rows"
            calls[-1][role] = sizes

    benchmark.group = f"fastdadpo generate, {rows} prompts, greedy, {world['max_new_tokens']} new tokens"
    benchmark.pedantic(command, setup=setup, teardown=teardown, rounds=settings.rounds,
                       warmup_rounds=settings.warmup_rounds)
    if benchmark.disabled:  # pytest-benchmark calls the target once, without setup's teardown
        teardown(_argv(world, outs[-1], extra))
    timed = len(calls) if benchmark.disabled else settings.rounds
    phase_s, command_s = [phase["wall"] for phase in phases[-timed:]], [call["command_s"] for call in calls[-timed:]]
    rate = rows / statistics.median(phase_s)
    # CPU milliseconds per row (generation phase, median over the timed rounds): in-process, the
    # command's whole generation; served, the client's share (requests, threads, JSON, the file) and
    # each server's (HTTP, batching, the model).
    cpu_ms_per_row = {key: round(1000 * statistics.median(phase["cpu"][key] for phase in phases[-timed:]) / rows, 2)
                      for key in phases[-1]["cpu"]}
    _rates[case.id] = rate
    at_one = _rates.get(Case("", 1, case.latency).id)  # the same server, one request in flight
    info = dict(case="served_generate", implementation=case.name, prompts=rows,
                max_new_tokens=world["max_new_tokens"], temperature=0.0,
                batch_size=BATCH_SIZE if case.concurrency is None else None, concurrency=case.concurrency,
                server_latency_s=case.latency if case.concurrency is not None else None,
                server_torch_threads=SERVER_THREADS if case.concurrency is not None else None,
                torch_threads=torch.get_num_threads(),
                generation_seconds=[round(s, 4) for s in phase_s], command_seconds=[round(s, 4) for s in command_s],
                cpu_ms_per_row=cpu_ms_per_row, rows_per_s=round(rate, 2),
                rows_per_s_best=round(rows / min(phase_s), 2),
                command_rows_per_s=round(rows / statistics.median(command_s), 2),
                ratio_to_in_process=round(rate / _rates["in-process"], 3) if "in-process" in _rates else None)
    if case.concurrency is not None:
        info["speedup_over_concurrency_1"] = round(rate / at_one, 2) if at_one else None
        # Mean batch the server generated (requests batched together), over the timed rounds.
        info["server_mean_batch"] = {role: round(statistics.mean(size for call in calls[-timed:]
                                                                  for size in call[role]), 2) for role in ROLES}
    benchmark.extra_info.update(info)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(*sys.argv[2:])
    else:
        sys.exit("usage: python bench/test_served_generate.py --serve NAME MODEL_DIR BATCHES_FILE (the benchmark "
                 "starts its servers this way)")
