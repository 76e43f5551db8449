"""The vocabulary divergences are computed over: the student tokenizer's, which every teacher must
share token for token (LM heads may be padded past it)."""
from __future__ import annotations

from fastdadpo.base.errors import ConfigError
from fastdadpo.models.loading import load_tokenizer, loading_failure


def check_tokenizers_compatible(student_tokenizer, teacher_tokenizer, *, student_head_rows: int,
                                teacher_head_rows: int) -> int:
    """The vocabulary size ``V`` that divergences are computed over (the first ``V`` rows of both
    LM heads). The tokenizers must map every token to the same id; heads may be padded past ``V``."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        raise ConfigError(f"model.teacher / model.student: the teacher and student tokenizers differ "
                          f"({_vocab_difference(student_vocab, teacher_vocab)}; {len(teacher_vocab)} tokens "
                          f"against {len(student_vocab)}); distillation compares next-token distributions id by "
                          f"id, so both models must use the same tokenizer")
    vocab_size = max(len(student_tokenizer), max(student_vocab.values()) + 1)
    for key, rows in (("model.student", student_head_rows), ("model.teacher", teacher_head_rows)):
        if rows < vocab_size:
            raise ConfigError(f"{key}: the LM head has {rows} rows, fewer than the tokenizer's {vocab_size} "
                              f"tokens; the model cannot score every token of its own tokenizer")
    return vocab_size


def _vocab_difference(student_vocab: dict, teacher_vocab: dict) -> str:
    for token, student_id in sorted(student_vocab.items(), key=lambda item: item[1]):
        teacher_id = teacher_vocab.get(token)
        if teacher_id != student_id:
            where_teacher = "absent from the teacher's" if teacher_id is None else f"id {teacher_id} in the teacher's"
            return f"token {token!r} is id {student_id} in the student's tokenizer and {where_teacher}"
    token = min(set(teacher_vocab) - set(student_vocab), key=teacher_vocab.get)
    return f"token {token!r} is id {teacher_vocab[token]} in the teacher's tokenizer and absent from the student's"


def config_vocab_rows(path: str, key: str) -> int:
    """The LM head's row count from a model directory's config alone (no weights loaded)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path).vocab_size)
    except Exception as exc:  # noqa: BLE001 (see loading_failure)
        raise loading_failure(key, path, "the model config", exc) from None


def shared_vocabulary(tokenizer, student_path: str, teachers: dict) -> int:
    """The vocabulary divergences are computed over: the student tokenizer's, which every teacher
    (``{config key: path}``, None entries skipped) must share token for token."""
    vocab = len(tokenizer)
    if not any(teachers.values()):
        return vocab
    student_rows = config_vocab_rows(student_path, "model.student")
    for key, path in teachers.items():
        if path:
            other = load_tokenizer(path, key)
            vocab = check_tokenizers_compatible(tokenizer, other, student_head_rows=student_rows,
                                                teacher_head_rows=config_vocab_rows(path, key))
            _check_same_template(tokenizer, other, key)
    return vocab


def _check_same_template(student_tokenizer, other_tokenizer, key: str) -> None:
    """Training renders every sequence once, with the student's chat template, and every model scores
    those tokens: a model whose own template differs would score text in a format it never saw (while
    ``generate`` and ``eval`` run it with its own)."""
    ours, theirs = (getattr(t, "chat_template", None) for t in (student_tokenizer, other_tokenizer))
    if ours != theirs:
        raise ConfigError(f"{key}: its tokenizer has the student's vocabulary but another chat template "
                          f"({'none' if theirs is None else f'{len(theirs)} characters'} against the student's "
                          f"{'none' if ours is None else f'{len(ours)} characters'}); training renders every "
                          f"sequence with the student's template, which this model would score in a format it was "
                          f"not trained on. Give both the same template (copy chat_template.jinja, or the "
                          f"tokenizer_config.json chat_template, from one directory to the other)")
