"""An offline world for the embedded demo and the tests: a small conversational task with
verifiable answers, a byte-level BPE tokenizer trained on it, and tiny causal LMs built from configs.
Nothing here downloads anything.

The task: short instructions about a list of words, phrased several ways. Five families have one
right answer (repeat the list, reverse it, count it, name its first or last word); three have
several (name any word of it, name a word of it that starts with a given letter, give any two of
its words in their order), so a teacher trained on them spreads its probability over the right
answers, the situation in which daDPO's teacher term should know better than a teacher's single
sample. A response is right when it matches any right answer exactly (after normalization). New
word lists give held-out prompts that no training row saw.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional

WORDS = ("red blue green yellow black white purple orange cat dog bird fish horse mouse lion tiger tree river "
         "stone cloud moon star sun rain snow wind apple bread milk cheese house door window chair table lamp "
         "book pen cup ship train road hill lake").split()
NUMBER_WORDS = ("zero one two three four five six seven eight nine").split()

TEMPLATES: Dict[str, List[str]] = {
    "repeat": ["Please repeat after me: {seq}", "Can you say this back to me: {seq}", "Echo these words: {seq}"],
    "reverse": ["Say these words backwards: {seq}", "Reverse the order of: {seq}",
                "Read this list from the end: {seq}"],
    "count": ["How many words are in: {seq}", "Count the words: {seq}", "Tell me the number of words in: {seq}"],
    "first": ["What is the first word of: {seq}", "Which word comes first in: {seq}",
              "Name the opening word of: {seq}"],
    "last": ["What is the last word of: {seq}", "Which word comes last in: {seq}", "Name the final word of: {seq}"],
    "pick": ["Name any word of: {seq}", "Pick one word from: {seq}", "Give me one of these words: {seq}"],
    "starts": ["Name a word starting with {letter} from: {seq}", "Which word begins with {letter} in: {seq}",
               "Find a word with first letter {letter} in: {seq}"],
    "pair": ["Give any two words of this list in their order: {seq}", "Pick two words, keeping their order: {seq}",
             "Name two of these words in order: {seq}"],
}
SINGLE_ANSWER_TASKS = ("repeat", "reverse", "count", "first", "last")
MULTI_ANSWER_TASKS = ("pick", "starts", "pair")
TASKS = SINGLE_ANSWER_TASKS  # the default of the helpers below, which the tests' fixtures were built with
ALL_TASKS = SINGLE_ANSWER_TASKS + MULTI_ANSWER_TASKS
# Letters that begin at least two of the words, so a "starts" list can hold several right answers.
_BY_LETTER = {letter: [w for w in WORDS if w[0] == letter] for letter in sorted({w[0] for w in WORDS})}
SHARED_LETTERS = tuple(letter for letter, words in _BY_LETTER.items() if len(words) >= 2)


def answer_for(task: str, words: List[str]) -> str:
    # Every answer word follows a space, as in the prompt, so it is the very same BPE token there:
    # copying is then plain induction, not induction plus a token mapping.
    if task == "repeat":
        return "You said: " + " ".join(words)
    if task == "reverse":
        return "Backwards: " + " ".join(reversed(words))
    if task == "count":
        return f"There are {NUMBER_WORDS[len(words)]} words."
    if task == "first":
        return f"The first word is {words[0]}."
    if task == "last":
        return f"The last word is {words[-1]}."
    raise ValueError(f"unknown task {task!r}")


def answers_for(task: str, words: List[str], letter: Optional[str] = None) -> List[str]:
    """Every right answer, in a fixed order (the single-answer families have one)."""
    if task == "pick":
        return [f"I pick {word}." for word in words]
    if task == "starts":
        return [f"It is {word}." for word in words if word[0] == letter]
    if task == "pair":
        return [f"In order: {first} {second}" for i, first in enumerate(words) for second in words[i + 1:]]
    return [answer_for(task, words)]


def _starts_words(rng: random.Random, count: int) -> tuple:
    """A letter and a list of ``count`` words in which two or three begin with it."""
    letter = rng.choice(SHARED_LETTERS)
    matching = rng.sample(_BY_LETTER[letter], min(len(_BY_LETTER[letter]), rng.randint(2, 3), count))
    others = rng.sample([w for w in WORDS if w[0] != letter], count - len(matching))
    words = matching + others
    rng.shuffle(words)
    return letter, words


def make_examples(n: int, seed: int, tasks=TASKS, min_words: int = 2, max_words: int = 5) -> List[dict]:
    """``n`` rows ``{"prompt", "answer", "answers", "task"}``: ``answers`` every right answer,
    ``answer`` one of them drawn uniformly (the one a teacher is trained on); the same seed gives the
    same rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = rng.choice(tasks)
        letter = None
        if task == "starts":
            letter, words = _starts_words(rng, max(rng.randint(min_words, max_words), 3))
        else:
            words = rng.sample(WORDS, rng.randint(min_words, max_words))
        prompt = rng.choice(TEMPLATES[task]).format(seq=" ".join(words), letter=letter)
        answers = answers_for(task, words, letter)
        answer = answers[0] if len(answers) == 1 else rng.choice(answers)
        rows.append({"prompt": prompt, "answer": answer, "answers": answers, "task": task})
    return rows


# --- tokenizer ---------------------------------------------------------------------------------------------

# <|endoftext|> is there because transformers 5 loads a Qwen2 model directory's tokenizer as
# Qwen2Tokenizer, which adds that token when missing: the reloaded tokenizer would outgrow the head.
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: List[str], vocab_size: int = 384, chat_template: Optional[str] = CHAT_TEMPLATE):
    """A byte-level BPE trained on ``texts``, as a transformers fast tokenizer with a chat template
    (eos ``<|end|>``, pad ``<|pad|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|pad|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def task_corpus(n: int = 600, seed: int = 0, tasks=TASKS) -> List[str]:
    """Texts that cover the task's prompts, answers and chat markup, for training the tokenizer."""
    rows = make_examples(n, seed, tasks=tasks)
    return [f"<|user|>\n{r['prompt']}<|end|>\n<|assistant|>\n{r['answer']}<|end|>\n" for r in rows]


# --- tiny models -------------------------------------------------------------------------------------------

def tiny_causal_lm(vocab_size: int, *, arch: str = "qwen2", hidden_size: int = 64, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate_size: Optional[int] = None, max_positions: int = 256,
                   tie_word_embeddings: bool = False, seed: int = 0, pad_token_id: int = 0, eos_token_id: int = 1):
    """A randomly initialized causal LM of a real architecture (Qwen2 or Llama), built offline."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in classes:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(classes)}")
    config_class, model_class = classes[arch]
    config = config_class(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads,
                          intermediate_size=intermediate_size or 3 * hidden_size,
                          max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
                          pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None, use_cache=True)
    torch.manual_seed(seed)
    return model_class(config)


def save_model_dir(model, tokenizer, path: str) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.save_pretrained(path)
    return path
