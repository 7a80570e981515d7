"""data.py: problem files are validated row by row with file:line errors; prompts are the model's chat
template with the limit in a system turn and the boxed-answer instruction in the user turn."""

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data import INSTRUCTION, build_prompt, load_problems
from tiny_run import make_tokenizer

DATA = Path(os.environ.get("THINKPRUNE_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))


def write(tmp_path, lines, name="p.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n")
    return f


def test_rows_load_with_ids_and_string_answers(tmp_path):
    f = write(tmp_path, [json.dumps({"id": "a", "problem": "1+1?", "answer": "2"}), "",
                         json.dumps({"problem": "half?", "answer": 0.5})])
    rows = load_problems(f)
    assert [r["answer"] for r in rows] == ["2", "0.5"]  # numbers from user files become strings
    assert [r["id"] for r in rows] == ["a", "p-3"]  # missing id: file stem and line


def test_line_separators_inside_json_strings_are_text(tmp_path):
    f = write(tmp_path, [json.dumps({"problem": "a\u2028b", "answer": "1"}, ensure_ascii=False),
                         json.dumps({"problem": "c", "answer": "2"})])
    rows = load_problems(f)
    assert [r["problem"] for r in rows] == ["a\u2028b", "c"] and rows[1]["id"] == "p-2"


def test_duplicate_id_names_both_lines(tmp_path):
    # 7 and "7" are one id once ids are strings; evaluation would merge the two problems' samples
    f = write(tmp_path, [json.dumps({"id": 7, "problem": "a", "answer": "1"}),
                         json.dumps({"id": "7", "problem": "b", "answer": "2"})])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: id '7' is already used on line 1"):
        load_problems(f)
    f = write(tmp_path, [json.dumps({"id": 7, "problem": "a", "answer": "1"})])
    assert load_problems(f)[0]["id"] == "7"


@pytest.mark.parametrize("line, message", [
    ('{"problem": "x"}', ":2: key 'answer' must be a non-empty string"),
    ('{"problem": "", "answer": "1"}', ":2: key 'problem' must be a non-empty string"),
    ('{"problem": "x", "answer": "  "}', ":2: key 'answer'"),
    ('{"problem": "x", "answer": true}', ":2: key 'answer'"),
    ('{"problem": "x", "answer": "1"', ":2: not valid JSON"),
    ('[1, 2]', ":2: expected a JSON object"),
    ('{"problem": "x", "answer": NaN}', ":2: key 'answer'"),  # json reads NaN and Infinity as floats
    ('{"problem": "x", "answer": 1e400}', ":2: key 'answer'"),
    ('{"problem": "x", "answer": ' + "9" * 5000 + "}", ":2: not valid JSON"),  # past int's digit limit
    ('{"id": null, "problem": "x", "answer": "1"}', ":2: key 'id'"),
    ('{"id": "", "problem": "x", "answer": "1"}', ":2: key 'id'"),
])
def test_bad_row_names_file_line_and_key(tmp_path, line, message):
    f = write(tmp_path, [json.dumps({"problem": "ok", "answer": "1"}), line])
    with pytest.raises(ValueError) as e:
        load_problems(f)
    assert str(e.value).startswith(str(f)) and message in str(e.value)


def test_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no problems"):
        load_problems(write(tmp_path, [""]))
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "absent.jsonl")


def test_shared_training_file_loads():
    if not (DATA / "train.jsonl").is_file():
        pytest.skip(f"no shared data at {DATA}")
    rows = load_problems(DATA / "train.jsonl")
    assert len(rows) > 100 and all(r["answer"].strip() for r in rows)


def test_prompt_has_limit_system_turn_and_instruction(tmp_path):
    make_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = build_prompt(tok, "2+2", limit=300, system_prompt="within {L} tokens.")
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    text = tok.decode(ids)
    assert text == f"<|system|>within 300 tokens.<eos><|user|>2+2 {INSTRUCTION}<eos><|assistant|>"
    free = tok.decode(build_prompt(tok, "2+2", limit=None, system_prompt="within {L} tokens."))
    assert free.startswith("<|user|>2+2") and "system" not in free  # no limit: no system turn
