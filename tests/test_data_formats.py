"""Prompt templates and prompt masking, checked by hand on the tiny model's real tokenizer."""
import pytest

from ftlib.data import formats
from ftlib.data.formats import BadRow, alpaca_example, alpaca_prompt, build_prompt, messages_example
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_MODEL))


def encoder(tokenizer, sequence_len=512, too_long="truncate", train_on_inputs=False):
    from ftlib.data.tokenize import Encoder

    return Encoder(tokenizer, sequence_len, too_long, train_on_inputs)


def rows(enc):
    """[(input_ids, labels)] of an Encoded batch."""
    o = enc.offsets
    return [(enc.input_ids[o[r]:o[r + 1]].tolist(), enc.labels[o[r]:o[r + 1]].tolist()) for r in range(len(o) - 1)]


def trained_pieces(tokenizer, ids, labels):
    """The trained tokens as strings, each contiguous run joined."""
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    if current:
        runs.append(current)
    return [tokenizer.convert_ids_to_tokens(r) for r in runs]


# ----------------------------------------------------------------------------------------------------- templates
def test_templates_are_the_notebooks_word_for_word():
    assert alpaca_prompt("Give three tips for staying healthy.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n")
    assert alpaca_prompt("Translate.", "Hola {amigo}") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\n"
        "Hola {amigo}\n\n### Response:\n")
    assert alpaca_prompt("Say hi.", style="chat") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\nUSER: Say hi.\nASSISTANT:")
    assert alpaca_prompt("Translate.", "Hola", style="chat").endswith("\n\nUSER: Translate.\nHola\nASSISTANT:")
    # Serving formats a bare instruction, or a row, the same way.
    assert build_prompt("Say hi.", "chat") == alpaca_prompt("Say hi.", style="chat")
    assert build_prompt({"instruction": "Translate.", "input": "Hola"}) == alpaca_prompt("Translate.", "Hola")
    assert build_prompt({"instruction": "Say hi.", "input": None}) == alpaca_prompt("Say hi.")


def test_alpaca_example_text_and_prompt_length():
    text, prompt_len = alpaca_example({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "instruct")
    assert text == alpaca_prompt("Say hi.") + "Hi!" and text[prompt_len:] == "Hi!"
    text, prompt_len = alpaca_example({"prompt": "Say hi.", "answer": "Hi!"}, "chat",
                                      {"instruction": "prompt", "output": "answer"})
    assert text[prompt_len:] == "Hi!" and text[:prompt_len].endswith("USER: Say hi.\nASSISTANT:")


@pytest.mark.parametrize("row, reason", [
    ({"instruction": "x"}, "missing_field"),
    ({"instruction": "x", "output": None}, "missing_field"),
    ({"instruction": "x", "output": ["a"]}, "wrong_type"),
    ({"instruction": 3, "output": "a"}, "wrong_type"),
    (["instruction", "output"], "wrong_type"),
    ({"instruction": "x", "output": "  \n"}, "empty_output"),
])
def test_alpaca_bad_rows(row, reason):
    with pytest.raises(BadRow) as e:
        alpaca_example(row, "instruct")
    assert e.value.reason == reason


# ----------------------------------------------------------------------------------------------------- masking
def test_alpaca_masking_by_hand(tokenizer):
    text, prompt_len = alpaca_example({"instruction": "Say hi.", "output": "Hi!"}, "instruct")
    [(ids, labels)] = rows(encoder(tokenizer).encode([text], [[(prompt_len, len(text))]], True, True))
    # The notebook's input ids: the tokenizer's own tokens of the whole text, then EOS.
    assert ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    # Exactly the response and EOS are trained; every prompt token is -100.
    assert trained_pieces(tokenizer, ids, labels) == [["H", "i", "!", "</s>"]]
    prompt_tokens = len(tokenizer(text[:prompt_len])["input_ids"])
    assert labels[:prompt_tokens] == [-100] * prompt_tokens and -100 not in labels[prompt_tokens:]
    # Chat style, a response starting with a space.
    text, prompt_len = alpaca_example({"instruction": "Say hi.", "output": " Hi!"}, "chat")
    [(ids, labels)] = rows(encoder(tokenizer).encode([text], [[(prompt_len, len(text))]], True, True))
    assert tokenizer.convert_ids_to_tokens(ids[-6:]) == ["T", ":", "▁H", "i", "!", "</s>"]
    assert trained_pieces(tokenizer, ids, labels) == [["▁H", "i", "!", "</s>"]]


def test_a_token_straddling_the_junction_is_trained(tokenizer):
    # "a litt" + "le friend": the tokenizer merges "▁little" across the junction. Counting the prompt's own tokens
    # (the notebook's way) would mask it; it holds response characters, so it is trained.
    text = "a little friend"
    [(ids, labels)] = rows(encoder(tokenizer).encode([text], [[(len("a litt"), len(text))]], True, True))
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "▁a", "▁little", "▁friend", "</s>"]
    assert labels == [-100, -100, ids[2], ids[3], ids[4]]
    assert len(tokenizer("a litt")["input_ids"]) == 4  # what the notebook would have masked: one too many


def test_completion_and_train_on_inputs(tokenizer):
    [(ids, labels)] = rows(encoder(tokenizer).encode(["Once upon a time"], [[(0, 16)]], True, True))
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels == [-100] + ids[1:]  # all trained but the first token, which nothing predicts
    text, prompt_len = alpaca_example({"instruction": "Say hi.", "output": "Hi!"}, "instruct")
    [(ids, labels)] = rows(encoder(tokenizer, train_on_inputs=True).encode([text], [[(prompt_len, len(text))]],
                                                                           True, True))
    assert labels == [-100] + ids[1:]


def test_too_long_truncate_and_drop(tokenizer):
    text, prompt_len = alpaca_example({"instruction": "Say hi.", "output": "Hi there, little friend!"}, "instruct")
    full = len(tokenizer(text)["input_ids"]) + 1
    spans = [[(prompt_len, len(text))]]
    enc = encoder(tokenizer, sequence_len=full - 3).encode([text], spans, True, True)
    [(ids, labels)] = rows(enc)
    assert enc.truncated == 1 and len(ids) == full - 3 and ids[-1] != tokenizer.eos_token_id  # as the notebook
    assert ids == tokenizer(text)["input_ids"][: full - 3]
    enc = encoder(tokenizer, sequence_len=full - 3, too_long="drop").encode([text], spans, True, True)
    assert rows(enc) == [] and [s.reason for s in enc.skipped] == ["too_long"]
    # A prompt that fills the window leaves nothing to train: skipped as too long, even when truncating.
    enc = encoder(tokenizer, sequence_len=prompt_len // 10).encode([text], spans, True, True)
    assert rows(enc) == [] and enc.skipped[0].reason == "too_long" and "prompt fills" in enc.skipped[0].detail
    # Exactly at the limit: kept whole, with its EOS.
    enc = encoder(tokenizer, sequence_len=full).encode([text], spans, True, True)
    assert enc.truncated == 0 and rows(enc)[0][0][-1] == tokenizer.eos_token_id


def test_messages_masking_by_hand(tokenizer):
    render = formats.chat_renderer(tokenizer, None)  # the tiny tokenizer has no template: the documented default
    turns = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": "Bye now"}]
    text, spans = messages_example({"messages": turns}, render)
    assert text == "<s>Be kind.\n\nUSER: Hi\nASSISTANT: Hello</s>\nUSER: Bye\nASSISTANT: Bye now</s>\n"
    assert [text[a:b] for a, b in spans] == [" Hello</s>", " Bye now</s>"]
    [(ids, labels)] = rows(encoder(tokenizer).encode([text], [spans], False, False))
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] and ids[0] == tokenizer.bos_token_id
    assert trained_pieces(tokenizer, ids, labels) == [["▁He", "ll", "o", "</s>"], ["▁B", "y", "e", "▁n", "ow", "</s>"]]


def test_messages_bad_rows_and_templates(tokenizer):
    render = formats.chat_renderer(tokenizer, None)
    cases = [({"messages": "hi"}, "wrong_type"), ({"messages": [{"role": "user"}]}, "missing_field"),
             ({"messages": [{"role": "user", "content": 1}]}, "wrong_type"),
             ({"messages": [{"role": "user", "content": "hi"}]}, "empty_output"), ({}, "missing_field")]
    for row, reason in cases:
        with pytest.raises(BadRow) as e:
            messages_example(row, render)
        assert e.value.reason == reason, row
    # The recipe's template wins over the default; one that rewrites earlier turns is refused, clearly.
    custom = formats.chat_renderer(tokenizer, "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                              "{% endfor %}")
    text, spans = messages_example({"messages": [{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "b"}]}, custom)
    assert text == "[user] a\n[assistant] b\n" and [text[a:b] for a, b in spans] == ["[assistant] b"]
    rewriting = formats.chat_renderer(tokenizer, "{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                                                 "{% endfor %}")
    from ftlib.data import DataError

    with pytest.raises(DataError, match="chat template"):
        messages_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                         rewriting)
