"""Prompt sets: jsonl, datasets directories and files, HH format, chat template, length limits."""

import copy
import json

import pytest

from infalign.lm.models import encode_prompt
from infalign.lm.prompts import hh_prompt, hh_to_messages, load_prompts
from infalign.run.config import PromptSetConfig

HH = [
    "\n\nHuman: What is two plus two?\n\nAssistant: Four.",
    "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a story.\n\nAssistant: Once upon a time.",
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_plain_and_limit(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "x": 1} for i in range(5)])
    assert load_prompts(PromptSetConfig(source=src)) == [f"p{i}" for i in range(5)]
    assert load_prompts(PromptSetConfig(source=src, limit=2)) == ["p0", "p1"]


def test_hh_format(tmp_path):
    src = _jsonl(tmp_path / "hh.jsonl", [{"chosen": t} for t in HH])
    out = load_prompts(PromptSetConfig(source=src, column="chosen", format="hh"))
    assert out == [
        "\n\nHuman: What is two plus two?\n\nAssistant:",
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a story.\n\nAssistant:",
    ]
    with pytest.raises(ValueError, match=r"prompt 3.*Assistant"):
        hh_prompt("Human: no answer", 3)
    assert hh_to_messages(out[1]) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a story."},
    ]


def test_datasets_dir_and_files(tmp_path):
    import datasets

    rows = {"chosen": HH, "rejected": ["a", "b"]}
    d = tmp_path / "ds"
    datasets.Dataset.from_dict(rows).save_to_disk(str(d))
    cfg = PromptSetConfig(source=str(d), column="chosen", format="hh")
    assert load_prompts(cfg)[0].endswith("two?\n\nAssistant:")
    dd = tmp_path / "dsdict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows),
            "test": datasets.Dataset.from_dict({"chosen": HH[:1]}),
        }
    ).save_to_disk(str(dd))
    got = load_prompts(PromptSetConfig(source=str(dd), split="test", column="chosen", format="hh"))
    assert len(got) == 1
    with pytest.raises(ValueError, match=r"split 'valid'.*'test', 'train'"):
        load_prompts(PromptSetConfig(source=str(dd), split="valid", column="chosen"))
    csv = tmp_path / "p.csv"
    csv.write_text("prompt,other\nhello,1\nworld,2\n")
    assert load_prompts(PromptSetConfig(source=str(csv), limit=1)) == ["hello"]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(PromptSetConfig(source=str(tmp_path / "none.jsonl")))
    src = _jsonl(tmp_path / "p.jsonl", [{"text": "a"}])
    with pytest.raises(ValueError, match=r"column 'prompt'.*\['text'\]"):
        load_prompts(PromptSetConfig(source=src))
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(PromptSetConfig(source=str(empty)))
    src = _jsonl(tmp_path / "n.jsonl", [{"prompt": "a"}, {"prompt": 3}])
    with pytest.raises(ValueError, match=r"entry 1.*int"):
        load_prompts(PromptSetConfig(source=src))
    with pytest.raises(ValueError, match="format"):
        load_prompts(PromptSetConfig(source=src, format="xml"))
    with pytest.raises(ValueError, match=r"expected a \.jsonl"):
        p = tmp_path / "x.txt"
        p.write_text("a")
        load_prompts(PromptSetConfig(source=str(p)))


def test_max_prompt_tokens(tmp_path, tiny_lm):
    _, tok = tiny_lm
    long = "The quick brown fox jumps over the lazy dog. " * 5
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "short"}, {"prompt": long}])
    n = len(encode_prompt(tok, long))
    with pytest.raises(ValueError, match=f"prompt 1 has {n} tokens > max_prompt_tokens=20"):
        load_prompts(PromptSetConfig(source=src, max_prompt_tokens=20), tok)
    out = load_prompts(PromptSetConfig(source=src, max_prompt_tokens=20, truncate=True), tok)
    assert out[0] == "short"
    assert len(encode_prompt(tok, out[1])) <= 20 and long.endswith(out[1])
    with pytest.raises(ValueError, match="tokenizer"):
        load_prompts(PromptSetConfig(source=src, max_prompt_tokens=20))


def test_chat_template(tmp_path, tiny_lm):
    tok = copy.deepcopy(tiny_lm[1])
    src = _jsonl(tmp_path / "hh.jsonl", [{"chosen": t} for t in HH])
    cfg = PromptSetConfig(source=src, column="chosen", format="hh", chat_template=True)
    with pytest.raises(ValueError, match="no chat template"):
        load_prompts(cfg, tok)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    out = load_prompts(cfg, tok)
    assert out[1] == "<user>Hi\n<assistant>Hello!\n<user>Tell me a story.\n<assistant>"
    plain = PromptSetConfig(source=src, column="chosen", chat_template=True, limit=1)
    assert load_prompts(plain, tok)[0].startswith("<user>\n\nHuman: What")


def test_a_non_utf8_prompts_file_is_named_with_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl' line 2 is not UTF-8 text \(byte 0xe9"):
        load_prompts(PromptSetConfig(source=str(path)))


def test_one_prompt_list_check_everywhere():
    from infalign.lm.prompts import check_prompt_list

    assert check_prompt_list(("a", "b")) == ["a", "b"]
    for bad, why in [
        ([], "non-empty list"),
        ("abc", "non-empty list"),
        (["a", 3], r"\[1\] is int"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_prompt_list(bad)
