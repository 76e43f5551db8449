"""ADPA as released: `fastdadpo generate --keep-chosen` (the dataset's chosen kept, only the student
sampled) end to end with tiny models, and recipes that chain trainings (init, regenerate) as ADPA+
does: DCKD, pairs regenerated from the DCKD student, ADPA from it."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from fastdadpo.base.errors import ConfigError
from fastdadpo.commands.recipe import load_recipe
from test_generate import MAX_NEW_TOKENS, expect_user_error, read_rows, reference_greedy, run_cli, unwrapped

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = {"role": "system", "content": "Be brief."}
# A preference set with its chosen responses in every form such sets have them: a string (with spacing
# and non-ASCII text that must survive as they are), one assistant message, TRL's implicit prompt
# inside the messages. Its own rejected responses ("blue dog", "tree") are what the output replaces.
ROWS = [
    {"prompt": "Please repeat after me: red cat", "chosen": "red cat", "rejected": "blue dog", "answer": "red cat"},
    {"prompt": [SYSTEM, {"role": "user", "content": "Count the words: sun"}], "chosen": "  There is one word.\n",
     "rejected": "blue dog"},
    {"chosen": [{"role": "user", "content": "Which word comes last in: tree river"},
                {"role": "assistant", "content": "river — the last one"}],
     "rejected": [{"role": "user", "content": "Which word comes last in: tree river"},
                  {"role": "assistant", "content": "tree"}]},
    {"prompt": "Echo these words: dog", "chosen": [{"role": "assistant", "content": "dog ✓"}], "task": "echo",
     "rejected": "blue dog"},
    {"prompt": "Reverse the order of: apple bread milk", "chosen": "milk bread apple", "rejected": "blue dog"},
]
CHOSEN = ["red cat", "  There is one word.\n", "river — the last one", "dog ✓", "milk bread apple"]
PROMPT_MESSAGES = [[{"role": "user", "content": "Please repeat after me: red cat"}],
                   [SYSTEM, {"role": "user", "content": "Count the words: sun"}],
                   [{"role": "user", "content": "Which word comes last in: tree river"}],
                   [{"role": "user", "content": "Echo these words: dog"}],
                   [{"role": "user", "content": "Reverse the order of: apple bread milk"}]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("preferences") / "preferences.jsonl", ROWS)


def keep_chosen_command(student, prompts, out, *extra):
    return ["generate", "--keep-chosen", "--student", student, "--prompts", prompts, "--out", str(out),
            "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2", "--temperature", "0", *extra]


@pytest.fixture(scope="module")
def kept_output(student_dir, preference_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept") / "pairs.jsonl"
    result = run_cli(keep_chosen_command(student_dir, preference_file, out))
    assert result.returncode == 0, result.stderr
    return out


# --- generate --keep-chosen ----------------------------------------------------------------------------------

def test_chosen_kept_as_given_and_rejected_the_students_greedy_output(kept_output, student_dir):
    rows = read_rows(kept_output)
    assert [row["index"] for row in rows] == list(range(len(ROWS)))
    assert [row["chosen"] for row in rows] == CHOSEN
    assert [row["rejected"] for row in rows] == reference_greedy(student_dir, PROMPT_MESSAGES)
    assert rows[0]["answer"] == "red cat" and rows[3]["task"] == "echo"
    # The input's own rejected responses are not what the output holds (the student's are).
    assert "blue dog" not in kept_output.read_text(encoding="utf-8")
    settings = json.loads((kept_output.parent / "pairs.jsonl.settings.json").read_text())
    assert settings["keep_chosen"] is True and settings["teacher"] is None and settings["temperature"] == 0


def test_greedy_is_deterministic_and_a_killed_run_resumes(kept_output, student_dir, preference_file, tmp_path):
    again = tmp_path / "again.jsonl"
    assert run_cli(keep_chosen_command(student_dir, preference_file, again)).returncode == 0
    assert again.read_bytes() == kept_output.read_bytes()

    rows = kept_output.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "pairs.jsonl"
    out.write_text(rows[4] + rows[0] + rows[1][: len(rows[1]) // 2], encoding="utf-8")
    shutil.copy(kept_output.parent / "pairs.jsonl.settings.json", tmp_path / "pairs.jsonl.settings.json")
    result = run_cli(keep_chosen_command(student_dir, preference_file, out))
    assert result.returncode == 0, result.stderr
    assert "dropped a partial last line" in result.stderr and "2 already in" in result.stdout
    assert out.read_bytes() == kept_output.read_bytes()


def test_an_output_of_the_other_mode_is_not_continued(capsys, kept_output, teacher_dir, student_dir,
                                                      preference_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    shutil.copy(kept_output, out)
    shutil.copy(kept_output.parent / "pairs.jsonl.settings.json", tmp_path / "pairs.jsonl.settings.json")
    before = out.read_bytes()
    sampled = ["generate", "--teacher", teacher_dir, "--student", student_dir, "--prompts", preference_file,
               "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", "2", "--temperature", "0"]
    expect_user_error(capsys, sampled, f"{out} was generated with other settings", "keep_chosen True -> False")
    assert out.read_bytes() == before


def test_a_kept_chosen_edited_since_is_refused(capsys, kept_output, student_dir, preference_file, tmp_path):
    rows = read_rows(kept_output)
    rows[2]["chosen"] = "something the dataset never said"
    out = tmp_path / "pairs.jsonl"
    write_jsonl(out, rows)
    shutil.copy(kept_output.parent / "pairs.jsonl.settings.json", tmp_path / "pairs.jsonl.settings.json")
    expect_user_error(capsys, keep_chosen_command(student_dir, preference_file, out),
                      f"{out} line 3: its 'chosen' is not the chosen response of prompt 2")


def test_an_output_of_other_chosen_responses_is_not_continued(capsys, kept_output, student_dir, tmp_path):
    edited = write_jsonl(tmp_path / "edited.jsonl", ROWS[:4] + [dict(ROWS[4], chosen="bread milk apple")])
    out = tmp_path / "pairs.jsonl"
    shutil.copy(kept_output, out)
    shutil.copy(kept_output.parent / "pairs.jsonl.settings.json", tmp_path / "pairs.jsonl.settings.json")
    expect_user_error(capsys, keep_chosen_command(student_dir, edited, out),
                      f"{out} was generated with other settings (prompts_sha256")


def test_rows_without_one_chosen_response_are_refused(capsys, tmp_path, student_dir):
    out = tmp_path / "out.jsonl"
    missing = write_jsonl(tmp_path / "missing.jsonl", [ROWS[0], ROWS[4], {"prompt": "Echo: sun", "rejected": "x"}])
    expect_user_error(capsys, keep_chosen_command(student_dir, missing, out),
                      f"{missing} line 3: the row has no 'chosen' field; --keep-chosen keeps each row's own chosen")
    empty = write_jsonl(tmp_path / "empty.jsonl", [dict(ROWS[0], chosen=" ")])
    expect_user_error(capsys, keep_chosen_command(student_dir, empty, out), f"{empty} line 1: the row has an empty")
    two = write_jsonl(tmp_path / "two.jsonl", [ROWS[0], dict(ROWS[4], chosen=[
        {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])])
    expect_user_error(capsys, keep_chosen_command(student_dir, two, out), f"{two} line 2: the row has a 'chosen' of 2")
    assert not out.exists()


def test_teacher_flag_rules(capsys, tmp_path, teacher_dir, student_dir, preference_file):
    out = tmp_path / "out.jsonl"
    expect_user_error(capsys, keep_chosen_command(student_dir, preference_file, out, "--teacher", teacher_dir),
                      f"--keep-chosen takes 'chosen' from the prompt rows and never runs a teacher, so --teacher "
                      f"{teacher_dir} would be unused")
    expect_user_error(capsys, ["generate", "--student", student_dir, "--prompts", preference_file, "--out", str(out)],
                      "--teacher is required")
    assert not out.exists()


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(kept_output, student_dir, preference_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = run_cli(keep_chosen_command(student_dir, preference_file, out),
                     launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "fastdadpo"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.read_bytes() == kept_output.read_bytes()


# --- recipes that chain trainings ----------------------------------------------------------------------------

def test_the_shipped_adpa_plus_recipe_chains_as_released():
    recipe = load_recipe(os.path.join(REPO, "configs", "recipes", "adpa-plus.yaml"))
    assert [name for name, _, _ in recipe.trainings()] == ["dSFT", "DCKD", "ADPA", "ADPA+"]
    assert recipe.generate["keep_chosen"] is True and recipe.generate["temperature"] == 0
    configs = {name: recipe.training_config(*training) for training in recipe.trainings() for name in [training[0]]}
    assert configs["DCKD"]["data"]["train"] == recipe.prompts  # the dataset's own pairs
    assert configs["ADPA+"]["model"]["student"] == recipe.final("DCKD")
    assert configs["ADPA"]["model"]["student"] == recipe.dsft_final
    assert configs["ADPA+"]["data"]["train"] == recipe.pairs_for("ADPA+") != recipe.pairs_for("ADPA")
    for name in ("DCKD", "ADPA", "ADPA+"):
        assert configs[name]["train"]["lr"] == 5e-7
    assert not recipe.uses_pairs()  # so its generate stage has nothing to do


def test_regenerated_pairs_follow_the_training_they_start_from():
    path = os.path.join(REPO, "configs", "recipes", "adpa-plus.yaml")
    pairs = load_recipe(path).pairs_for("ADPA+")
    assert load_recipe(path, ["students.ADPA+.train.lr=1e-6"]).pairs_for("ADPA+") == pairs
    assert load_recipe(path, ["students.DCKD.train.lr=1e-6"]).pairs_for("ADPA+") != pairs
    assert load_recipe(path, ["dsft.train.epochs=2"]).pairs_for("ADPA+") != pairs  # DCKD starts from dSFT
    assert load_recipe(path, ["generate.temperature=0.7"]).pairs_for("ADPA+") != pairs


BASE = {"output_dir": "x", "teacher": "t", "student": "s", "prompts": "p"}


@pytest.mark.parametrize("recipe, message", [
    (dict(BASE, students={"A": {"init": "B"}}), "students.A.init: there is no training 'B'; it can start from dSFT"),
    (dict(BASE, students={"A": {"init": "B"}, "B": {}}), "students.A.init: 'B' is listed after 'A'"),
    (dict(BASE, students={"A": {"init": "A"}}), "students.A.init: a training cannot start from itself"),
    (dict(BASE, dsft=False, students={"A": {"init": "dSFT"}}), "there is no training 'dSFT' (dsft: false trains none)"),
    (dict(BASE, students={"A": {"init": ["dSFT"]}}), "students.A.init must name a training"),
    (dict(BASE, students={"A": {"regenerate": "yes"}}), "students.A.regenerate must be true or false"),
    (dict(BASE, dsft=False, students={"A": {"regenerate": True}}), "students.A.regenerate: this entry starts from "
                                                                    "the starting student"),
    (dict(BASE, students={"dSFT": {}}), "'dSFT' is the distilled SFT's name"),
    (dict(BASE, students={"A+": {}, "A-": {}}), "'A-' and 'A+' would share the output directory"),
    (dict(BASE, dsft="none"), "dsft must be a mapping, or false"),
    (dict(BASE, generate={"keep_chosenn": True}), "generate: unknown key(s) keep_chosenn"),
    (dict(BASE, generate={"teacher": "t2"}), "generate: unknown key(s) teacher"),
], ids=["unknown", "later", "itself", "no-dsft", "not-a-name", "regenerate-type", "regenerate-start", "dsft-name",
        "same-dir", "dsft-type", "generate-key", "generate-teacher"])
def test_bad_chains_are_clear_errors(tmp_path, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError) as raised:
        load_recipe(str(path))
    assert unwrapped(message) in unwrapped(str(raised.value)) and str(path) in str(raised.value)


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1")


def _run(recipe_path):
    return subprocess.run([sys.executable, "-m", "fastdadpo", "run", recipe_path], capture_output=True, text=True,
                          timeout=600, env=_env())


@pytest.fixture(scope="module")
def teacher_reference_dir(tmp_path_factory, tokenizer):
    from fastdadpo.demo.synthetic import save_model_dir, tiny_causal_lm

    model = tiny_causal_lm(len(tokenizer) + 64, hidden_size=48, layers=2, heads=4, kv_heads=2, seed=5,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return save_model_dir(model, tokenizer, str(tmp_path_factory.mktemp("teacher_reference")))


@pytest.mark.slow
def test_a_tiny_adpa_plus_chain_runs_and_resumes(tmp_path, student_dir, teacher_dir, teacher_reference_dir,
                                                 preference_file):
    """As released: DCKD on the dataset's own pairs (so the recipe's generate stage has nothing to do)
    → pairs regenerated from the DCKD student (dataset chosen, greedy rejected) → ADPA from it; a rerun
    skips every stage."""
    train = {"micro_batch_size": 2, "grad_accum": 1, "max_steps": 2, "warmup_ratio": 0.0, "seed": 7}
    recipe = {
        "output_dir": str(tmp_path / "run"), "teacher": teacher_dir, "student": student_dir,
        "prompts": preference_file, "dsft": False,
        "generate": {"keep_chosen": True, "temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 2},
        "train_common": {"data": {"max_length": 64, "max_prompt_length": 40}, "train": train,
                         "deepspeed": {"zero_stage": 0}},
        "students": {
            "DCKD": {"objective": {"name": "dckd"}, "data": {"train": preference_file}, "train": {"lr": 1e-2}},
            "ADPA+": {"init": "DCKD", "regenerate": True, "objective": {"name": "adpa"},
                      "model": {"teacher_reference": teacher_reference_dir}, "train": {"lr": 1e-3}},
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))  # the students' order is the chain's
    result = _run(str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    loaded = load_recipe(str(path))
    dckd_final, regenerated = loaded.final("DCKD"), loaded.pairs_for("ADPA+")
    assert "no training reads" in result.stdout and not os.path.exists(loaded.pairs)
    rows = read_rows(regenerated)
    assert [row["chosen"] for row in rows] == CHOSEN
    assert [row["rejected"] for row in rows] == reference_greedy(dckd_final, PROMPT_MESSAGES)
    assert json.loads(open(regenerated + ".settings.json").read())["student"] == os.path.realpath(dckd_final)
    adpa_config = yaml.safe_load(open(loaded.path("configs", "ADPA-.yaml")))
    assert adpa_config["model"]["student"] == dckd_final and adpa_config["data"]["train"] == regenerated
    assert os.path.exists(os.path.join(loaded.final("ADPA+"), "config.json"))
    for marker in ("train-DCKD", "generate-ADPA-", "train-ADPA-"):
        assert os.path.exists(loaded.path("stages", f"{marker}.json")), marker

    again = _run(str(path))
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = [line for line in again.stdout.splitlines() if "skipped" in line]
    for stage in ("DCKD:", "generate-ADPA-:", "ADPA+:"):
        assert any(stage in line for line in skipped), (stage, again.stdout)
    assert "done in" not in again.stdout

    # DCKD's config changes: DCKD and everything downstream train again from the start (their old
    # checkpoints are another run's), the old runs kept beside, the new pairs from the new DCKD.
    recipe["students"]["DCKD"]["train"]["lr"] = 5e-3
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    changed = _run(str(path))
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    for name in ("DCKD", "ADPA+"):
        assert f"{name}: its config or the model it starts from changed since it finished" in changed.stdout
        assert os.path.exists(os.path.join(loaded.training_dir(name) + ".replaced-1", "final", "config.json"))
        assert os.path.exists(os.path.join(loaded.final(name), "config.json"))
    reloaded = load_recipe(str(path))
    assert reloaded.pairs_for("ADPA+") != regenerated and os.path.exists(reloaded.pairs_for("ADPA+"))
    assert [row["rejected"] for row in read_rows(reloaded.pairs_for("ADPA+"))] == \
        reference_greedy(dckd_final, PROMPT_MESSAGES)
