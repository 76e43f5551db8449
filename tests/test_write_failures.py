"""Outputs that cannot be written, found before the work (an ``--out`` under a file, a directory) or
met during it (a disk that fills): one paragraph, exit 2, and nothing already done lost."""
import json
import os
import tempfile

import pytest

from fastdadpo.base.errors import ConfigError, UserError
from fastdadpo.base.files import check_writable
from fastdadpo.cli import main


def test_check_writable_names_what_writing_would_meet(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, reason in ((afile / "out.jsonl", f"{afile} is a file, not a directory"), (tmp_path, "is a directory")):
        with pytest.raises(ConfigError, match=f"--out: {path} cannot be written \\({reason}"):
            check_writable(str(path), "--out")
    check_writable(str(tmp_path / "new" / "out.json"), "--out")  # its folder made, nothing left in it
    assert os.listdir(tmp_path / "new") == []


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Repeat: red car"}) + "\n" + json.dumps({"prompt": "Say: lake"}) + "\n")
    return str(path)


def test_generate_checks_out_before_loading_and_keeps_rows_on_a_full_disk(tmp_path, capsys, monkeypatch,
                                                                            student_dir, teacher_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = ["generate", "--teacher", teacher_dir, "--student", student_dir, "--prompts", _prompts(tmp_path),
            "--max-new-tokens", "3", "--temperature", "0", "--batch-size", "1"]
    assert main(args + ["--out", str(afile / "pairs.jsonl")]) == 2
    assert "is a file, not a directory" in " ".join(capsys.readouterr().err.split())
    # The disk fills after the first batch: that row stays, whole; the rerun writes only the other.
    from fastdadpo.commands import generate_output

    out, append, calls = tmp_path / "pairs.jsonl", generate_output.append_rows, []

    class FullDisk:  # the output file once the disk is full: its writes fail as the kernel's would
        def __init__(self, handle):
            self.name = handle.name

        def write(self, text):
            raise OSError(28, "No space left on device")

    def filling(handle, rows):
        calls.append(rows)
        append(handle if len(calls) == 1 else FullDisk(handle), rows)

    monkeypatch.setattr(generate_output, "append_rows", filling)
    assert main(args + ["--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "writing rows failed (No space left on device)" in err and "run the same command again" in err
    assert len(out.read_text().splitlines()) == 1
    monkeypatch.setattr(generate_output, "append_rows", append)
    assert main(args + ["--out", str(out)]) == 0
    assert sorted(json.loads(line)["index"] for line in out.read_text().splitlines()) == [0, 1]


def test_metrics_that_cannot_be_written_stop_training_in_one_paragraph(tmp_path):
    from fastdadpo.commands.metrics import MetricsLog

    log = MetricsLog(str(tmp_path / "metrics.jsonl"), True, keep_until=0)
    log.write({"step": 1, "loss": 1.0})
    log.path = str(tmp_path)  # a directory: what a full or read-only disk gives, an OSError at the append
    with pytest.raises(UserError, match=r"writing step 2's metrics failed .*last complete checkpoint kept"):
        log.write({"step": 2, "loss": 0.5})


def test_eval_results_are_kept_when_out_fails_at_the_end(tmp_path):
    from fastdadpo.commands.evaluate import _write_results

    out = tmp_path / "gone" / "eval.json"  # its folder removed after the check: writing it fails
    with pytest.raises(UserError, match=r"--out: writing the results to .* failed .*they are in (\S+) instead") \
            as error:
        _write_results(str(out), json.dumps({"models": {}}))
    fallback = str(error.value).split("they are in ")[1].split(" instead")[0]
    assert fallback.startswith(tempfile.gettempdir()) and json.loads(open(fallback).read()) == {"models": {}}
    os.remove(fallback)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_final_model_is_readable_as_the_umask_says(tmp_path, student_dir, tokenizer, umask):
    """transformers writes weight shards through a temporary file (mode 0600): final/ would be
    unreadable to a server running as another user. Every file of it gets the umask's mode."""
    from transformers import AutoModelForCausalLM

    from fastdadpo.engine.checkpoints import write_final

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    previous = os.umask(umask)
    try:
        final = write_final(model.state_dict(), model, tokenizer, str(tmp_path))
    finally:
        os.umask(previous)
    modes = {name: os.stat(os.path.join(final, name)).st_mode & 0o777 for name in os.listdir(final)}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
