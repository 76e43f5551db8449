"""``data.string_rows``: plain-string rows through the chat template (the default) or as raw text,
token for token as TRL tokenizes its standard format; TRL's language-modeling ``text`` rows."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from fastdadpo.base.errors import ConfigError, DataError
from fastdadpo.core.rows import load_examples, load_prompts
from fastdadpo.core.tokenized import tokenize_examples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = [{"prompt": "Repeat after me: red car", "chosen": " red car", "rejected": " blue sky"},
         {"prompt": "Name the first word: lake road ", "chosen": "lake", "rejected": "road."},  # a space at the seam
         {"prompt": "Say: tree", "chosen": "tree<|end|>", "rejected": ""}]  # eos given; an empty response
CHAT = {"prompt": [{"role": "user", "content": "Repeat after me: red car"}],
        "chosen": [{"role": "assistant", "content": "red car"}], "rejected": [{"role": "assistant", "content": "no"}]}


def _write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _tokenized(tokenizer, path, string_rows, fields=("chosen", "rejected"), **kwargs):
    examples = load_examples(path, require=("prompt",) + fields)
    return tokenize_examples(examples, tokenizer, max_length=256, max_prompt_length=128, fields=fields,
                             string_rows=string_rows, **kwargs)[0]


def test_raw_plain_rows_are_tokenized_as_trl_does(tokenizer, tmp_path):
    """TRL 1.16's DPO preprocessing of standard rows, by TRL's own functions: the eos text appended to
    each response, prompt and prompt + response tokenized, the response after their common prefix."""
    data_utils = pytest.importorskip("trl.data_utils")

    def trl_row(row):
        eos = tokenizer.eos_token
        responses = {name: row[name] if row[name].endswith(eos) else row[name] + eos for name in ("chosen", "rejected")}
        prompt_ids = data_utils._tokenize(tokenizer, row["prompt"])["input_ids"]
        full = {name: data_utils._tokenize(tokenizer, row["prompt"] + text)["input_ids"]
                for name, text in responses.items()}
        cut = min(data_utils.common_prefix_length(prompt_ids, ids) for ids in full.values())
        return prompt_ids[:cut], full["chosen"][cut:], full["rejected"][cut:]

    ours = _tokenized(tokenizer, _write(tmp_path, PLAIN), "raw")
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in ours] == [trl_row(row) for row in PLAIN]
    # The template's markers are nowhere in a raw row; the default keeps them.
    templated = _tokenized(tokenizer, _write(tmp_path, PLAIN), "template")
    assert "<|user|>" not in tokenizer.decode(ours[0].prompt_ids)
    assert "<|user|>" in tokenizer.decode(templated[0].prompt_ids)


def test_conversational_rows_keep_the_template_under_raw(tokenizer, tmp_path):
    path = _write(tmp_path, [CHAT])
    raw, templated = _tokenized(tokenizer, path, "raw"), _tokenized(tokenizer, path, "template")
    assert (raw[0].prompt_ids, raw[0].chosen_ids) == (templated[0].prompt_ids, templated[0].chosen_ids)


def test_the_mode_is_part_of_the_tokenization_cache_key(tokenizer, tmp_path):
    path, cache = _write(tmp_path, PLAIN), str(tmp_path / "cache")
    templated = _tokenized(tokenizer, path, "template", cache_dir=cache)
    raw = _tokenized(tokenizer, path, "raw", cache_dir=cache)
    assert raw[0].prompt_ids != templated[0].prompt_ids
    assert _tokenized(tokenizer, path, "raw", cache_dir=cache)[0].prompt_ids == raw[0].prompt_ids
    with pytest.raises(ConfigError, match="data.string_rows"):
        _tokenized(tokenizer, path, "jinja")


def test_text_rows_train_on_the_whole_text_with_raw_only(tokenizer, tmp_path):
    path = _write(tmp_path, [{"text": "the red car is fast"}, {"text": "lake"}])
    (first, second) = _tokenized(tokenizer, path, "raw", fields=("chosen",))
    whole = tokenizer("the red car is fast" + tokenizer.eos_token)["input_ids"]
    assert first.prompt_ids == whole[:1] and first.chosen_ids == whole[1:] and first.rejected_ids is None
    assert second.chosen_ids[-1] == tokenizer.eos_token_id
    with pytest.raises(DataError, match="line 1.*set data.string_rows: raw"):
        _tokenized(tokenizer, path, "template", fields=("chosen",))
    with pytest.raises(DataError, match="line 1.*'text' row.*a 'rejected' response"):
        load_examples(path)  # a preference objective needs pairs
    with pytest.raises(DataError, match="line 1.*'text' row.*a prompt to answer"):
        load_prompts(path)  # generation and evaluation need prompts
    empty = _write(tmp_path, [{"text": "  "}], "empty.jsonl")
    with pytest.raises(DataError, match="line 1: field 'text' must be a non-empty string"):
        load_examples(empty, require=("prompt", "chosen"))


def test_sft_trains_on_text_rows_end_to_end(tmp_path, student_dir):
    rows = [{"text": f"the {word} is on the road"} for word in ("car", "tree", "lake", "house")] * 2
    config = {"model": {"student": student_dir}, "objective": {"name": "sft"},
              "data": {"train": _write(tmp_path, rows), "max_length": 32, "string_rows": "raw",
                       "cache_dir": str(tmp_path / "cache")},
              "train": {"micro_batch_size": 4, "max_steps": 4, "lr": 1e-2, "warmup_ratio": 0.0,
                        "output_dir": str(tmp_path / "run")},
              "deepspeed": {"zero_stage": 0}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "train", str(path)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    config["data"]["string_rows"] = "jinja"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "fastdadpo", "train", str(path)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=REPO)
    assert result.returncode == 2 and "data.string_rows" in result.stderr and "Traceback" not in result.stderr


def test_eval_tokenizes_a_raw_response_as_training_does(tokenizer, tmp_path):
    """eval scores one response at a time: its prompt and response ids are training's (the cut at the
    common prefix, where the prompt's last token merges into the response), so prompt + response is
    the real sequence and the response is what the row says."""
    from fastdadpo.core import chat
    from fastdadpo.core.tokenized import sequence_token_ids

    examples = load_examples(_write(tmp_path, PLAIN), require=("prompt", "chosen"))
    trained = _tokenized(tokenizer, _write(tmp_path, PLAIN, "chosen.jsonl"), "raw", fields=("chosen",))
    merged = 0
    for example, row in zip(examples, trained):
        prompt_ids, response_ids = sequence_token_ids(tokenizer, example, example.chosen, "raw")
        assert (prompt_ids, response_ids) == (row.prompt_ids, row.chosen_ids)
        full = chat.raw_sequence_ids(tokenizer, example.prompt[0]["content"], example.chosen[0]["content"])
        assert prompt_ids + response_ids == full
        merged += len(prompt_ids) < len(chat.raw_prompt_ids(tokenizer, example.prompt[0]["content"]))
    assert merged, "no row's prompt merged into its response: the case this test is for never ran"
