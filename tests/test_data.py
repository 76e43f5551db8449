"""fastdadpo.core (rows, tokenized, batch): loaders and their errors, the truncation policy, the tokenization cache, the
tokenizer check, micro-batch splitting, and collated batches (masks, packing equivalence on real
tiny Qwen2 and Llama models)."""
import json
import re
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdadpo.base.errors import ConfigError, DataError
from fastdadpo.core import chat
from fastdadpo.core.batch import collate
from fastdadpo.core.rows import Example, RESPONSE_FIELDS, load_examples, load_prompts
from fastdadpo.core.tokenized import TokenizedExample, tokenize_examples, tokenizer_fingerprint
from fastdadpo.models.vocabulary import check_tokenizers_compatible

PAIR = {"prompt": "Please repeat after me: red cat", "chosen": "red cat", "rejected": "cat red"}
PAIR_MESSAGES = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count the words: sun moon"}],
    "chosen": [{"role": "assistant", "content": "There are two words."}],
    "rejected": [{"role": "assistant", "content": "Three."}],
}
USER = {"role": "user", "content": "Count the words: sun moon"}


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


# --- loading -------------------------------------------------------------------------------------------------

def test_jsonl_strings_and_messages(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**PAIR, "answer": "red cat", "task": "repeat"}, PAIR_MESSAGES])
    first, second = load_examples(path)
    assert first.prompt == [{"role": "user", "content": PAIR["prompt"]}]
    assert first.chosen == [{"role": "assistant", "content": "red cat"}]
    assert first.rejected == [{"role": "assistant", "content": "cat red"}]
    assert (first.answer, first.extra, first.source) == ("red cat", {"task": "repeat"}, f"{path} line 1")
    assert second.prompt == PAIR_MESSAGES["prompt"] and second.chosen == PAIR_MESSAGES["chosen"]
    assert (second.answer, second.extra, second.source) == (None, {}, f"{path} line 2")


def test_json_array_sources_name_the_line_each_row_starts_on(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([PAIR, PAIR_MESSAGES, {**PAIR, "answer": 3}], indent=2))
    examples = load_examples(str(path))
    lines = path.read_text().splitlines()
    for example in examples:
        line = int(example.source.rsplit(" ", 1)[1])
        assert lines[line - 1].strip() == "{"
    assert [e.source for e in examples][0] == f"{path} line 2"
    assert examples[1].prompt == PAIR_MESSAGES["prompt"] and examples[2].answer == "3"


def test_parquet_and_saved_datasets(tmp_path):
    import datasets

    rows = [PAIR_MESSAGES, {**PAIR_MESSAGES, "rejected": [{"role": "assistant", "content": "Two."}]}]
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(str(tmp_path / "splits"))

    parquet = load_examples(str(tmp_path / "d.parquet"))
    assert [e.rejected[0]["content"] for e in parquet] == ["Three.", "Two."]
    assert parquet[1].source == f"{tmp_path / 'd.parquet'} row 1"
    assert [e.prompt for e in parquet] == [PAIR_MESSAGES["prompt"]] * 2
    single = load_examples(str(tmp_path / "single"))
    assert [e.chosen for e in single] == [e.chosen for e in parquet]
    test_split = load_examples(f"{tmp_path / 'splits'}:test")
    assert len(test_split) == 1 and test_split[0].source == f"{tmp_path / 'splits'}:test row 0"
    with pytest.raises(DataError, match=r"splits train, test .*DIR:SPLIT"):
        load_examples(str(tmp_path / "splits"))
    with pytest.raises(DataError, match="no split 'valid'"):
        load_examples(f"{tmp_path / 'splits'}:valid")


def test_null_in_a_tabular_file_is_a_missing_field(tmp_path):
    import datasets

    datasets.Dataset.from_list([PAIR, {"prompt": "Count the words: a b", "chosen": "two", "rejected": None}]
                               ).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r"d\.parquet row 1: missing field 'rejected'"):
        load_examples(str(tmp_path / "d.parquet"))


def test_implicit_prompt(tmp_path):
    shared = [{"role": "system", "content": "Be brief."}, USER]
    row = {"chosen": shared + [{"role": "assistant", "content": "Two."}],
           "rejected": shared + [{"role": "assistant", "content": "Three."}]}
    (example,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert example.prompt == shared
    assert (example.chosen[0]["content"], example.rejected[0]["content"]) == ("Two.", "Three.")
    with pytest.raises(DataError, match="line 1: no field 'prompt'.*share 2 opening messages"):
        load_examples(write_jsonl(tmp_path / "same.jsonl", [{"chosen": shared, "rejected": shared}]))


def test_load_prompts_needs_only_a_prompt(tmp_path):
    (example,) = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "x", "id": 7}]))
    assert (example.chosen, example.rejected, example.answer, example.extra) == (None, None, "x", {"id": 7})
    with pytest.raises(DataError, match="line 1: missing field 'prompt'"):
        load_prompts(write_jsonl(tmp_path / "q.jsonl", [{"question": "hi"}]))


@pytest.mark.parametrize("rows, message", [
    ([PAIR, '{"prompt": "a", "chosen": "b"', PAIR], r"line 2: malformed JSON"),
    ([PAIR, PAIR, {"prompt": "a", "chosen": "b"}], r"line 3: missing field 'rejected' \(rows need prompt, chosen"),
    ([{**PAIR, "prompt": "  "}], r"line 1: field 'prompt' is empty"),
    ([{**PAIR, "chosen": []}], r"line 1: field 'chosen' must be a non-empty string or a list"),
    ([{**PAIR, "prompt": 5}], r"line 1: field 'prompt' must be a non-empty string .* got int"),
    ([{**PAIR, "prompt": [{"role": "human", "content": "x"}]}], r"line 1: field 'prompt' message 0 has role 'human'"),
    ([{**PAIR, "chosen": [{"role": "assistant"}]}], r"line 1: field 'chosen' message 0 must be an object with"),
    ([{**PAIR, "chosen": [USER]}], r"line 1: field 'chosen' must start with an assistant message"),
    ([{**PAIR, "answer": {"a": 1}}], r"line 1: field 'answer' must be a string, a number or a list of them"),
    ([{**PAIR, "answer": []}], r"line 1: field 'answer' is an empty list"),
    ([{**PAIR, "answer": ["a", ["b"]]}], r"line 1: field 'answer' .* holds a nested list"),
    ([{**PAIR, "answer": ["a", True]}], r"line 1: field 'answer' must be a string, a number or a list of them"),
    ([{**PAIR, "answer": ["a", None]}], r"line 1: field 'answer' holds a null among its answers"),
    ([PAIR, "[1, 2]"], r"line 2: expected an object with fields prompt, chosen, rejected; got list"),
    # What Python's JSON parser takes silently and a data row must not hold.
    ([PAIR, '{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"}'],
     r"line 2: key 'chosen' is written twice in one object"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "answer": NaN}'], r"line 1: NaN is not JSON"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "answer": -Infinity}'], r"line 1: -Infinity is not JSON"),
    (['{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}'], r"line 1: holds a lone surrogate"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "score": -1e999}'], r"line 1: holds the number -1e999, past"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "answer": ' + "9" * 5000 + "}"], r"line 1: holds an integer of 5,000 digits; a data row.s numbers have at most 4,300"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "x": ' + "[" * 100000 + "]" * 100000 + "}"],
     r"line 1: nested too deeply"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=message) as caught:
        load_examples(path)
    assert str(caught.value).startswith(path)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.xlsx").write_text("prompt,chosen\n")
    with pytest.raises(DataError, match=r"d\.xlsx: unknown data format; use \.jsonl"):
        load_examples(str(tmp_path / "d.xlsx"))
    (tmp_path / "broken.json").write_text('[\n  {"prompt": "a",\n   "chosen": }\n]')
    with pytest.raises(DataError, match=r"broken\.json line 3: malformed JSON"):
        load_examples(str(tmp_path / "broken.json"))
    (tmp_path / "object.json").write_text(json.dumps({"data": [PAIR]}))
    with pytest.raises(DataError, match="one array of row objects, found a dict"):
        load_examples(str(tmp_path / "object.json"))
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(PAIR).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl line 2: not UTF-8 text"):
        load_examples(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_examples(str(tmp_path / "empty.jsonl"))
    (tmp_path / "not_a_dataset").mkdir()
    with pytest.raises(DataError, match="not_a_dataset: cannot be read through datasets.load_dataset"):
        load_examples(str(tmp_path / "not_a_dataset"))


# --- tokenizing ----------------------------------------------------------------------------------------------

def make_example(prompt: str, chosen: str, rejected: str, source: str = "mem line 1") -> Example:
    return Example(prompt=[{"role": "user", "content": prompt}], chosen=[{"role": "assistant", "content": chosen}],
                        rejected=[{"role": "assistant", "content": rejected}], answer=None, source=source)


def reference_ids(tokenizer, example):
    prompt = chat.prompt_ids(tokenizer, example.prompt)
    return prompt, {name: chat.response_ids(tokenizer, example.prompt, example.response(name)) for name in
                    RESPONSE_FIELDS}


def test_truncation_policy_and_report(tokenizer):
    short = make_example("Echo these words: red", "red", "blue")
    long_prompt = make_example("Please repeat after me: " + "red blue green yellow black " * 4, "red", "blue")
    long_response = make_example("Echo these words: red", "red blue green yellow black white " * 5, "blue")
    prompt_short, responses_short = reference_ids(tokenizer, short)
    prompt_long, _ = reference_ids(tokenizer, long_prompt)
    _, responses_long = reference_ids(tokenizer, long_response)
    max_prompt_length, max_length = len(prompt_short) + 4, len(prompt_short) + 12
    assert len(prompt_long) > max_prompt_length and len(responses_long["chosen"]) > 12

    tokenized, report = tokenize_examples([short, long_prompt, long_response], tokenizer, max_length=max_length,
                                               max_prompt_length=max_prompt_length)
    assert [t.index for t in tokenized] == [0, 1, 2]
    assert tokenized[0].prompt_ids == prompt_short and tokenized[0].chosen_ids == responses_short["chosen"]
    assert tokenized[0].chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenized[1].prompt_ids == prompt_long[-max_prompt_length:]  # cut from the left
    assert tokenized[2].chosen_ids == responses_long["chosen"][:max_length - len(prompt_short)]  # from the right
    assert all(len(t.prompt_ids) + len(t.response_ids(name)) <= max_length
               for t in tokenized for name in RESPONSE_FIELDS)
    assert (report.rows, report.kept, report.prompt_truncated, report.response_truncated) == (
        3, 3, 1, {"chosen": 1, "rejected": 0})
    assert "kept 3, dropped 0" in report.summary() and "chosen 1" in report.summary()


def test_empty_teacher_response_is_dropped_and_empty_student_response_kept(tmp_path, tokenizer):
    """A model that stopped at once gives an empty response: as the teacher's (chosen) it would teach
    the student to stop, so the row is dropped and counted; as the student's (rejected) it is a real
    bad sample, kept as just the end-of-sequence token."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**PAIR, "chosen": ""}, {**PAIR, "rejected": ""}])
    examples = load_examples(str(path))
    tokenized, report = tokenize_examples(examples, tokenizer, max_length=64, max_prompt_length=32)
    assert [t.index for t in tokenized] == [1]
    assert tokenized[0].rejected_ids == [tokenizer.eos_token_id]
    assert report.dropped == {"empty chosen response": 1}
    assert report.dropped_sources == [f"{path} line 1: empty chosen response"]


def test_rows_with_an_empty_response_are_dropped_and_counted(tokenizer, monkeypatch):
    real = chat.response_ids
    monkeypatch.setattr(chat, "response_ids", lambda tok, prompt, response, prompt_token_ids=None: (
        [] if response[0]["content"] == "EMPTY" else real(tok, prompt, response, prompt_token_ids)))
    examples = [make_example("Echo: red", "red", "EMPTY", "f line 1"), make_example("Echo: blue", "blue", "red")]
    tokenized, report = tokenize_examples(examples, tokenizer, max_length=64, max_prompt_length=32)
    assert [t.index for t in tokenized] == [1]
    assert report.dropped == {"empty rejected response": 1} and report.dropped_sources == [
        "f line 1: empty rejected response"]
    assert "dropped 1 (empty rejected response: 1)" in report.summary()
    with pytest.raises(DataError, match="every one of the 1 rows was dropped.*f line 1"):
        tokenize_examples(examples[:1], tokenizer, max_length=64, max_prompt_length=32)


def test_length_settings_and_missing_fields_are_errors(tokenizer):
    example = make_example("Echo: red", "red", "blue")
    with pytest.raises(ConfigError, match=r"data\.max_prompt_length \(64\) must be smaller than data\.max_length"):
        tokenize_examples([example], tokenizer, max_length=64, max_prompt_length=64)
    prompt_only = Example(prompt=example.prompt, chosen=example.chosen, rejected=None, answer=None,
                               source="p.jsonl line 4")
    with pytest.raises(DataError, match=r"p\.jsonl line 4: field 'rejected' is missing"):
        tokenize_examples([prompt_only], tokenizer, max_length=64, max_prompt_length=32)
    (only_chosen,), _ = tokenize_examples([prompt_only], tokenizer, max_length=64, max_prompt_length=32,
                                               fields=("chosen",))
    assert only_chosen.rejected_ids is None and only_chosen.chosen_ids


def test_cache_is_reused_and_invalidated(tokenizer, tmp_path, monkeypatch):
    examples = [make_example(f"Echo these words: {w}", w, "no") for w in ("red", "blue", "green")]
    settings = dict(max_length=48, max_prompt_length=24, cache_dir=str(tmp_path / "cache"))
    first, first_report = tokenize_examples(examples, tokenizer, **settings)
    assert len(os.listdir(tmp_path / "cache")) == 1

    calls = []
    real = chat.prompt_ids
    monkeypatch.setattr(chat, "prompt_ids", lambda *args: calls.append(1) or real(*args))
    again, again_report = tokenize_examples(examples, tokenizer, **settings)
    assert calls == [] and again == first and again_report == first_report

    shorter, _ = tokenize_examples(examples, tokenizer, **{**settings, "max_length": 40})
    assert len(calls) == 3 and len(os.listdir(tmp_path / "cache")) == 2 and shorter == first
    edited = examples[:2] + [make_example("Echo these words: green", "green", "yes")]
    tokenize_examples(edited, tokenizer, **settings)
    assert len(calls) == 6


def test_tokenizer_fingerprint_covers_the_chat_template(tokenizer):
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|end|>", "<|end|> ")
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(copy.deepcopy(tokenizer)) == tokenizer_fingerprint(tokenizer)


# --- tokenizer compatibility ---------------------------------------------------------------------------------

def test_same_tokenizer_with_padded_teacher_head(tokenizer):
    vocab_size = len(tokenizer)
    assert check_tokenizers_compatible(tokenizer, tokenizer, student_head_rows=vocab_size,
                                            teacher_head_rows=vocab_size + 64) == vocab_size


def test_head_smaller_than_vocabulary(tokenizer):
    with pytest.raises(ConfigError, match=rf"model\.teacher: the LM head has 100 rows, fewer than the tokenizer's "
                                          rf"{len(tokenizer)} tokens"):
        check_tokenizers_compatible(tokenizer, tokenizer, student_head_rows=len(tokenizer), teacher_head_rows=100)


def test_different_tokenizers(tokenizer):
    from fastdadpo.demo.synthetic import build_tokenizer, task_corpus

    other = build_tokenizer(task_corpus(200, seed=7), vocab_size=300)
    with pytest.raises(ConfigError, match=r"tokenizers differ \(token '.+' is id \d+ in the student's tokenizer and "
                                          r"(id \d+ in|absent from) the teacher's"):
        check_tokenizers_compatible(tokenizer, other, student_head_rows=1000, teacher_head_rows=1000)


def test_a_teacher_with_another_chat_template_is_refused(tokenizer, student_dir, teacher_dir, tmp_path):
    """Same vocabulary, another template: training would score it through the student's template."""
    import shutil

    from fastdadpo.models.loading import load_tokenizer
    from fastdadpo.models.vocabulary import shared_vocabulary

    student = load_tokenizer(student_dir, "model.student")
    assert shared_vocabulary(student, student_dir, {"model.teacher": teacher_dir}) == len(student)
    other = tmp_path / "teacher"
    shutil.copytree(teacher_dir, other)
    templated = load_tokenizer(str(other), "model.teacher")
    templated.chat_template = student.chat_template.replace("<|end|>", "<|end|>\n")
    templated.save_pretrained(str(other))
    with pytest.raises(ConfigError, match="model.teacher: its tokenizer has the student's vocabulary but another chat "
                                          "template"):
        shared_vocabulary(student, student_dir, {"model.teacher": str(other)})


# --- micro-batches -------------------------------------------------------------------------------------------

# --- collating -----------------------------------------------------------------------------------------------

PAD = 0


def check_targets(batch, sequences, packed):
    """Targets are exactly the response ids, one position early; -100 (and sequence -1) elsewhere."""
    targets, owners = batch.targets, batch.target_sequence
    expected_targets = torch.full_like(targets, -100)
    expected_owners = torch.full_like(owners, -1)
    offset = 0
    for s, (prompt, response) in enumerate(sequences):
        row, start = (0, offset) if packed else (s, 0)
        first = start + len(prompt) - 1  # this position predicts the first response token
        expected_targets[row, first:first + len(response)] = torch.tensor(response)
        expected_owners[row, first:first + len(response)] = s
        assert batch.input_ids[row, start:start + len(prompt) + len(response)].tolist() == prompt + response
        assert batch.position_ids[row, start:start + len(prompt) + len(response)].tolist() == list(
            range(len(prompt) + len(response)))
        offset += len(prompt) + len(response)
    assert torch.equal(targets, expected_targets) and torch.equal(owners, expected_owners)
    assert batch.response_tokens.tolist() == [len(response) for _, response in sequences]
    for s in range(len(sequences)):  # each target is the next input token of its own sequence
        rows, positions = (owners == s).nonzero(as_tuple=True)
        assert torch.equal(batch.input_ids[rows, positions + 1], targets[rows, positions])


def test_collate_padded_and_packed_layouts():
    examples = [TokenizedExample([5, 6, 7], [8, 9, 1], [10, 1], index=4),
                TokenizedExample([11], [12, 1], [13, 14, 15, 1], index=9)]
    sequences = [([5, 6, 7], [8, 9, 1]), ([11], [12, 1]), ([5, 6, 7], [10, 1]), ([11], [13, 14, 15, 1])]

    padded = collate(examples, pad_token_id=PAD)
    assert padded.input_ids.shape == (4, 6) and padded.input_ids.dtype == torch.long
    assert (padded.num_sequences, padded.num_pairs, padded.has_rejected) == (4, 2, True)
    assert padded.example_index.tolist() == [4, 9]
    assert padded.attention_mask.tolist() == [[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 5 + [0]]
    assert padded.input_ids[1, 3:].tolist() == [PAD] * 3
    check_targets(padded, sequences, packed=False)

    packed = collate(examples, pad_token_id=PAD, packing=True)
    assert packed.attention_mask is None and packed.input_ids.shape == (1, 6 + 3 + 5 + 5)
    check_targets(packed, sequences, packed=True)
    boundaries = [5, 8, 13]  # last token of each sequence but the last: never a target
    assert packed.targets[0, boundaries].tolist() == [-100] * 3

    chosen_only = collate(examples, pad_token_id=PAD, include_rejected=False, packing=True)
    assert (chosen_only.num_sequences, chosen_only.num_pairs, chosen_only.has_rejected) == (2, 2, False)
    check_targets(chosen_only, sequences[:2], packed=True)


token_lists = st.lists(st.integers(min_value=2, max_value=50), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(token_lists, token_lists, token_lists), min_size=1, max_size=4), st.booleans(),
       st.booleans())
def test_collate_targets_for_any_lengths(triples, include_rejected, packing):
    examples = [TokenizedExample(prompt, chosen, rejected, index=i)
                for i, (prompt, chosen, rejected) in enumerate(triples)]
    names = RESPONSE_FIELDS if include_rejected else RESPONSE_FIELDS[:1]
    sequences = [(e.prompt_ids, e.response_ids(name)) for name in names for e in examples]
    batch = collate(examples, pad_token_id=PAD, include_rejected=include_rejected, packing=packing)
    check_targets(batch, sequences, packed=packing)


def sequence_logps(model, batch):
    """Summed log-probs of each sequence's response tokens, from final hidden states and the LM head."""
    from fastdadpo.models.loading import final_hidden_states, head_weight

    with torch.no_grad():
        hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)
        logps = torch.log_softmax(hidden @ head_weight(model).T, dim=-1)
    mask = batch.targets != -100
    token_logps = logps[mask].gather(-1, batch.targets[mask].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(batch.num_sequences, dtype=torch.float32).index_add_(
        0, batch.target_sequence[mask], token_logps)


@pytest.mark.parametrize("model_fixture", ["student_dir", "llama_dir"])
def test_packing_gives_the_same_log_probs_as_padding(model_fixture, request, tokenizer):
    from fastdadpo.models.loading import load_causal_lm
    from fastdadpo.demo.synthetic import make_examples

    model = load_causal_lm(request.getfixturevalue(model_fixture), dtype=torch.float32,
                                  device=torch.device("cpu"))
    rows = make_examples(5, seed=11, min_words=1, max_words=5)
    examples = [make_example(r["prompt"], r["answer"], " ".join(reversed(r["answer"].split()))) for r in rows]
    tokenized, _ = tokenize_examples(examples, tokenizer, max_length=64, max_prompt_length=48)
    assert len({len(t.prompt_ids) for t in tokenized}) > 1  # the layouts really differ

    padded = sequence_logps(model, collate(tokenized, pad_token_id=tokenizer.pad_token_id))
    packed = sequence_logps(model, collate(tokenized, pad_token_id=tokenizer.pad_token_id, packing=True))
    alone = torch.cat([sequence_logps(model, collate([t], pad_token_id=tokenizer.pad_token_id))
                       for t in tokenized])  # unbatched: chosen and rejected of one example
    alone = alone.view(len(tokenized), 2).T.reshape(-1)
    # Sequence sums of ~100 in fp32 differ in the last bits between layouts (other matmul shapes).
    torch.testing.assert_close(packed, padded, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("template,message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than 0.5 s"),
    ("{{ 1 / 0 }}", "fails on these messages (ZeroDivisionError"),
    ('{{ messages[0]["content"].encode("zz") }}', "fails on these messages (LookupError"),
    ("{% for a in range(10**9) %}x{% endfor %}", "fails on these messages (OverflowError"),
    # One expression asking for tens of GB at once: refused before it is made (no timer could ring in it).
    ('{{ "x" * 10**10 }}', "rejects these messages: it repeats a value of 1 items 10000000000 times"),
    ("{{ [0] * 3 * 10**9 }}", "rejects these messages: it repeats a value of 3 items 1000000000 times"),
    ("{{ 7 ** (10**9) }}", "rejects these messages: it raises to the power 1000000000"),  # (Jinja: ** from the left)
    ("{{ ((10 ** 4096) ** 4096) ** 4096 }}", "rejects these messages: it makes a number of about 55,734,272 bits"),
    ("{% set ns = namespace(n=10 ** 4000) %}{% for _ in range(400) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
     "rejects these messages: it makes a number of about 1,700,828 bits"),  # squared step by step
])
def test_a_chat_template_that_hangs_or_crashes_is_one_error(tokenizer, monkeypatch, template, message):
    import copy
    import time

    monkeypatch.setattr(chat, "TEMPLATE_SECONDS", 0.5)
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = template
    started = time.monotonic()
    with pytest.raises(DataError, match=re.escape(message)):
        chat.prompt_ids(broken, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < 5
    assert chat.prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])  # the timer is gone, renders go on
