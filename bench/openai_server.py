"""A small OpenAI-compatible server on 127.0.0.1, backed by tiny Hugging Face models, for the tests
and the benchmark of served models (``fastdadpo generate --teacher-url``, ``model.teacher_url``).

It speaks the parts of vLLM's API a served model uses: ``GET /v1/models`` (with ``root`` and
``max_model_len``), ``POST /tokenize`` and ``POST /v1/completions`` with token-id prompts, seeds and
``prompt_logprobs``. Like vLLM it batches the greedy requests that arrive together (within
``batch_window`` seconds, up to ``max_batch``), so a client's concurrency shows; a sampled request
runs alone under its own seed. ``faults`` scripts what the next requests meet (a status, a delay, a
dropped connection, malformed JSON, short log-probs; ``("pass",)`` lets one request through), ``latency`` adds a fixed delay to every
completion (a network hop), and ``serve`` swaps the model behind a name.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

import torch


# A seeded sample seeds torch's one global generator: two servers in one process take turns.
_SEEDED = threading.Lock()


class _Listener(ThreadingHTTPServer):
    # The standard 5 pending connections drop a burst of concurrent requests' SYNs, which the client
    # resends only after a second: a server meant to take many requests at once listens for more.
    request_queue_size = 1024


@dataclass
class _Job:
    model: str
    prompt: List[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    done: threading.Event = field(default_factory=threading.Event)
    ids: Optional[List[int]] = None
    error: Optional[BaseException] = None


class LoopbackOpenAIServer:
    def __init__(self, models: Dict[str, str], *, logprobs: bool = True, tokenize: bool = True,
                 batch_window: float = 0.005, max_batch: int = 32, latency: float = 0.0, max_model_len: int = 4096):
        self.models: Dict[str, tuple] = {}
        self.logprobs, self.tokenize, self.latency = logprobs, tokenize, latency
        self.batch_window, self.max_batch, self.max_model_len = batch_window, max_batch, max_model_len
        self.faults: List[tuple] = []
        self.requests: List[dict] = []
        self._lock, self._model_lock = threading.Lock(), threading.Lock()
        for name, path in models.items():
            self.serve(name, path)
        self._queue: "queue.Queue[_Job]" = queue.Queue()
        self._worker = threading.Thread(target=self._batch_loop, daemon=True)
        self._worker.start()
        self._http = _Listener(("127.0.0.1", 0), self._handler())
        self._http.daemon_threads = True
        self._http.handle_error = lambda request, address: None  # a client that gave up closed its socket
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"

    def serve(self, name: str, path: str, *, root: Optional[str] = None) -> None:
        """Serve the model at ``path`` as ``name`` (replacing what was served under it)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        vocab = len(tokenizer)
        rows = model.get_output_embeddings().weight.shape[0]
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            suppress_tokens=list(range(vocab, rows)) or None)
        with self._model_lock:
            self.models[name] = (model, tokenizer, root or path)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._queue.put(None)

    # --- the model's work ----------------------------------------------------------------------------------

    def _batch_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, deadline = [job], time.monotonic() + self.batch_window
            while job.temperature == 0 and len(batch) < self.max_batch:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            groups: Dict[tuple, List[_Job]] = {}
            for item in batch:
                key = (item.model, item.max_tokens, item.temperature, item.top_p, id(item) if item.temperature else 0)
                groups.setdefault(key, []).append(item)
            for group in groups.values():
                self._generate(group)

    def _generate(self, group: List[_Job]) -> None:
        from fastdadpo.models.generation import generate_batch

        first = group[0]
        try:
            with self._model_lock:
                model, tokenizer, _ = self.models[first.model]
            with _SEEDED:
                outputs = generate_batch(model, tokenizer, [job.prompt for job in group], max_new_tokens=first.max_tokens,
                                         temperature=first.temperature, top_p=first.top_p,
                                         seed=first.seed if first.temperature else None, device=torch.device("cpu"))
            for job, ids in zip(group, outputs):
                job.ids = ids
        except BaseException as exc:  # noqa: BLE001 (handed to the request's thread)
            for job in group:
                job.error = exc
        for job in group:
            job.done.set()

    def _prompt_logprobs(self, name: str, ids: List[int]) -> list:
        with self._model_lock:
            model, tokenizer, _ = self.models[name]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logps = torch.log_softmax(logits, -1)  # over every head row, as vLLM (and the fused kernels) normalize
        entries: list = [None]
        for position in range(1, len(ids)):
            row, token = logps[position - 1], ids[position]
            entries.append({str(token): {"logprob": float(row[token]), "rank": int((row > row[token]).sum()) + 1,
                                         "decoded_token": tokenizer.decode([token])}})
        return entries

    # --- HTTP ----------------------------------------------------------------------------------------------

    def _next_fault(self) -> Optional[tuple]:
        with self._lock:
            return self.faults.pop(0) if self.faults else None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else a reply's headers and body wait on the client's delayed ACK

            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload) -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                server.requests.append({"path": self.path, "headers": dict(self.headers)})
                if self.path.split("?")[0] != "/v1/models":
                    return self._reply(404, {"error": {"message": "not found"}})
                with server._model_lock:
                    listed = [{"id": name, "object": "model", "root": root, "max_model_len": server.max_model_len}
                              for name, (_, _, root) in server.models.items()]
                self._reply(200, {"object": "list", "data": listed})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = self.path.split("?")[0]
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if path == "/tokenize" and server.tokenize:
                    _, tokenizer, _ = server.models[body["model"]]
                    tokens = tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                    return self._reply(200, {"tokens": tokens, "count": len(tokens),
                                             "max_model_len": server.max_model_len})
                if path != "/v1/completions":
                    return self._reply(404, {"error": {"message": "not found"}})
                if body.get("model") not in server.models:
                    return self._reply(404, {"error": {"message": f"model {body.get('model')!r} does not exist"}})
                fault = server._next_fault()
                if fault is not None:
                    kind = fault[0]
                    if kind == "status":
                        return self._reply(fault[1], {"error": {"message": "scripted"}})
                    if kind == "sleep":
                        time.sleep(fault[1])
                    if kind == "close":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    if kind == "json":
                        return self._reply(200, fault[1])
                time.sleep(server.latency)
                self._complete(body, short=fault is not None and fault[0] == "short")

            def _complete(self, body: dict, short: bool) -> None:
                name, prompt = body["model"], body["prompt"]
                _, tokenizer, _ = server.models[name]
                if isinstance(prompt, str):
                    prompt = tokenizer.encode(prompt, add_special_tokens=False)
                choice = {"index": 0}
                if "prompt_logprobs" in body and server.logprobs:
                    entries = server._prompt_logprobs(name, prompt)
                    choice.update(text="", finish_reason="length", prompt_logprobs=entries[:-1] if short else entries)
                    return self._reply(200, {"object": "text_completion", "model": name, "choices": [choice],
                                             "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1}})
                job = _Job(name, prompt, int(body.get("max_tokens", 16)), float(body.get("temperature", 1.0)),
                           float(body.get("top_p", 1.0)), body.get("seed"))
                server._queue.put(job)
                job.done.wait()
                if job.error is not None:
                    return self._reply(500, {"error": {"message": repr(job.error)}})
                ended = tokenizer.eos_token_id in job.ids
                choice.update(text=tokenizer.decode(job.ids, skip_special_tokens=True),
                              finish_reason="stop" if ended else "length")
                self._reply(200, {"object": "text_completion", "model": name, "choices": [choice],
                                  # generate_batch drops pad tokens a response may hold: one cut short used them all
                                  "usage": {"prompt_tokens": len(prompt),
                                            "completion_tokens": len(job.ids) if ended else job.max_tokens}})

        return Handler
