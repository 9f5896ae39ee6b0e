"""Validation of training data before any model is loaded: every problem names file, 1-based line, field."""

import json

import pytest

from training_hub.data import DataValidationError, check_data, load_preference_data

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def write_lines(path, lines):
    """Write raw lines (str are JSON-encoded unless already str; bytes are written as is)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, bytes):
                f.write(line + b"\n")
            else:
                f.write((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n")
    return path


def problems_of(path, **kwargs):
    with pytest.raises(DataValidationError) as info:
        check_data(str(path), **kwargs)
    return info.value


# (name, bad line content, expected field, expected words in the message)
MALFORMED = [
    ("invalid_json", '{"messages": [', "line", "invalid JSON"),
    ("not_an_object", "[1, 2, 3]", "record", "expected a JSON object, got a list"),
    ("string_record", '"hello"', "record", "expected a JSON object, got a string"),
    ("missing_messages", {"conversation": []}, "messages", 'missing "messages"'),
    ("empty_messages", {"messages": []}, "messages", "the list is empty"),
    ("messages_not_list", {"messages": "Hi"}, "messages", "expected a list of messages, got a string"),
    ("message_not_object", {"messages": ["Hi"]}, "messages[0]", "expected a message object"),
    ("unknown_role", {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     "messages[1].role", "unknown role 'bot'"),
    ("missing_role", {"messages": [{"content": "a"}]}, "messages[0].role", "missing"),
    ("non_string_content", {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]},
     "messages[0].content", "expected a string, got a number"),
    ("null_content", {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]},
     "messages[0].content", "expected a string, got a null"),
    ("no_assistant", {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
     "messages", "no assistant message"),
    ("unknown_message_field", {"messages": [{"role": "assistant", "content": "b", "tool_calls": []}]},
     "messages[0].tool_calls", "unknown message field 'tool_calls'"),
    ("bad_reasoning", {"messages": [{"role": "assistant", "content": "b", "reasoning_content": 1}]},
     "messages[0].reasoning_content", "expected a string"),
    ("unmask_not_bool", {**GOOD, "unmask": "yes"}, "unmask", "expected true or false"),
    ("alpaca_missing_output", {"instruction": "Add 2 and 3"}, "output", "missing"),
    ("alpaca_empty_instruction", {"instruction": " ", "output": "5"}, "instruction", "empty"),
    ("alpaca_bad_input", {"instruction": "Add", "input": 3, "output": "5"}, "input", "expected a string"),
]


@pytest.mark.parametrize("name,bad,field,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_each_malformed_line_is_reported_with_file_line_and_field(tmp_path, name, bad, field, words):
    path = write_lines(tmp_path / f"{name}.jsonl", [GOOD, GOOD, bad, GOOD])
    error = problems_of(path)
    assert isinstance(error, ValueError)
    assert len(error.problems) == 1
    problem = error.problems[0]
    assert (problem.path, problem.line, problem.field) == (str(path), 3, field)
    assert words in problem.message
    assert problem.valid  # says what would be valid
    assert f"{path}:3: {field}: " in str(error)
    assert f"(valid: {problem.valid})" in str(error)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = write_lines(tmp_path / "latin1.jsonl", [GOOD, '{"messages": "caf\u00e9"}'.encode("latin-1")])
    [problem] = problems_of(path).problems
    assert (problem.line, problem.field) == (2, "line")
    assert "not valid UTF-8" in problem.message and problem.valid == "UTF-8 encoded text"


def test_empty_file_and_blank_only_file(tmp_path):
    for name, content in (("empty.jsonl", b""), ("blank.jsonl", b"\n  \n\n")):
        (tmp_path / name).write_bytes(content)
        [problem] = problems_of(tmp_path / name).problems
        assert problem.line is None and "file is empty" in problem.message
        assert str(problem).startswith(f"{tmp_path / name}: file: file is empty")


def test_missing_path_and_unsupported_type(tmp_path):
    error = problems_of(tmp_path / "nope.jsonl")
    assert f"{tmp_path / 'nope.jsonl'}: data_path: no such file or directory" in str(error)
    (tmp_path / "data.tsv").write_text("a\tb\n")
    assert "unsupported file type '.tsv'" in str(problems_of(tmp_path / "data.tsv"))
    (tmp_path / "emptydir").mkdir()
    assert "holds no .jsonl, .json, .parquet or .csv files" in str(problems_of(tmp_path / "emptydir"))


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path):
    path = write_lines(tmp_path / "gaps.jsonl", [GOOD, "", "   ", {"messages": 1}])
    [problem] = problems_of(path).problems
    assert problem.line == 4


def test_all_bad_lines_are_listed(tmp_path):
    lines = [GOOD, "not json", {"messages": []}, GOOD, {"messages": [{"role": "x", "content": 1}]}]
    error = problems_of(write_lines(tmp_path / "many.jsonl", lines))
    located = [(p.line, p.field) for p in error.problems]
    assert located == [(2, "line"), (3, "messages"), (5, "messages[0].role"), (5, "messages[0].content")]
    assert error.truncated is False
    assert str(error).startswith("4 problems in the training data")


def test_collection_stops_after_20_problems(tmp_path):
    error = problems_of(write_lines(tmp_path / "bad.jsonl", ["{"] * 30))
    assert [p.line for p in error.problems] == list(range(1, 21))
    assert error.truncated and "stopped after the first 20" in str(error)


def test_valid_chat_and_alpaca_pass(tmp_path):
    lines = [GOOD, {"instruction": "Add", "input": "2 and 3", "output": "5", "id": 7},
             {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                           {"role": "assistant", "content": "", "reasoning_content": "r"},
                           {"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}],
              "unmask": True, "source": "extra top-level fields are ignored"}]
    assert check_data(str(write_lines(tmp_path / "ok.jsonl", lines))) is None


def test_json_list_reports_the_line_where_the_record_starts(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, {"messages": [{"role": "user", "content": 1}]}], indent=2))
    [problem] = problems_of(path).problems
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    assert len(starts) == 3 and starts[2] > 10
    assert problem.line == starts[2]
    assert problem.field == "messages[0].content"


def test_json_list_with_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"messages": []},\n {"messages": [}\n]\n')
    error = problems_of(path)
    assert [(p.line, p.field) for p in error.problems] == [(2, "messages"), (3, "file")]
    assert "invalid JSON" in error.problems[1].message


def test_json_file_with_json_lines_is_accepted(tmp_path):
    path = write_lines(tmp_path / "lines.json", [GOOD, {"messages": {}}])
    [problem] = problems_of(path).problems
    assert (problem.line, problem.field) == (2, "messages")


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, GOOD, {"messages": [{"role": "user", "content": "only a question"}]}]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    [problem] = problems_of(path).problems
    assert (problem.path, problem.line, problem.field) == (str(path), 3, "messages")
    assert "no assistant message" in problem.message
    pq.write_table(pa.Table.from_pylist(rows[:2]), path)
    assert check_data(str(path)) is None  # null-filled optional fields (reasoning_content) are fine


def test_directory_of_files_names_the_bad_file(tmp_path):
    write_lines(tmp_path / "a.jsonl", [GOOD])
    (tmp_path / "sub").mkdir()
    bad = write_lines(tmp_path / "sub" / "b.jsonl", [GOOD, GOOD, {"messages": "x"}])
    (tmp_path / "notes.txt").write_text("ignored")
    [problem] = problems_of(tmp_path).problems
    assert (problem.path, problem.line) == (str(bad), 3)


def test_saved_dataset_rows(tmp_path):
    import datasets

    rows = [GOOD, {"messages": [{"role": "user", "content": "u"}, {"role": "robot", "content": "a"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    [problem] = problems_of(tmp_path / "saved").problems
    assert (problem.line, problem.field) == (2, "messages[1].role")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    assert check_data(str(tmp_path / "dd")) is None


def test_pretraining_documents_and_custom_column(tmp_path):
    path = write_lines(tmp_path / "docs.jsonl", [{"document": "text"}, {"text": "x"}, {"document": 3}])
    error = problems_of(path, kind="pretraining")
    assert [(p.line, p.field) for p in error.problems] == [(2, "document"), (3, "document")]
    assert "set document_column_name" in error.problems[0].message
    assert check_data(str(write_lines(tmp_path / "t.jsonl", [{"text": "x"}])), kind="pretraining",
                      document_column_name="text") is None


def test_preference_pairs(tmp_path):
    chosen = [{"role": "assistant", "content": "good"}]
    ok = [{"prompt": "Q?", "chosen": "A", "rejected": "B"},
          {"prompt": [{"role": "user", "content": "Q?"}], "chosen": chosen,
           "rejected": [{"role": "assistant", "content": "bad"}]}]
    path = write_lines(tmp_path / "pref.jsonl", ok + [{"prompt": "Q", "chosen": "A"},
                                                      {"prompt": "Q", "chosen": [{"role": "user", "content": "x"}],
                                                       "rejected": ""}])
    error = problems_of(path, kind="preference")
    assert [(p.line, p.field) for p in error.problems] == [(3, "rejected"), (4, "chosen"), (4, "rejected")]
    pairs = load_preference_data(str(write_lines(tmp_path / "ok.jsonl", ok)))
    assert pairs == [ok[0], {"prompt": ok[1]["prompt"], "chosen": chosen, "rejected": ok[1]["rejected"]}]


def test_unknown_kind_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of chat, pretraining, preference"):
        check_data(str(write_lines(tmp_path / "a.jsonl", [GOOD])), kind="dpo")


def test_check_data_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, training_hub.data as d; d.check_data; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_error_survives_pickling(tmp_path):
    """datasets.map worker processes send errors back pickled: the problems must come back intact."""
    import pickle

    error = problems_of(write_lines(tmp_path / "bad.jsonl", ["{"] * 25))
    copy = pickle.loads(pickle.dumps(error))
    assert copy.problems == error.problems and copy.truncated and str(copy) == str(error)


def test_csv_rows_with_json_messages_and_their_line_numbers(tmp_path):
    import csv

    path = tmp_path / "chat.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages", "note"])
        writer.writerow([json.dumps(GOOD["messages"]), "a\nmultiline note"])  # one record over two lines
        writer.writerow([json.dumps([{"role": "user", "content": "only a question"}]), "x"])
        writer.writerow(["[not json", "y"])
    error = problems_of(path)
    assert [(p.line, p.field) for p in error.problems] == [(4, "messages"), (5, "messages")]
    assert "no assistant message" in error.problems[0].message and "not valid JSON" in error.problems[1].message
    docs = tmp_path / "docs.csv"
    docs.write_text("document\nsome text\nmore text\n")
    assert check_data(str(docs), kind="pretraining") is None
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,chosen,rejected\nQ?,A,B\n")
    assert load_preference_data(str(pairs))[0]["chosen"] == "A"


@pytest.mark.parametrize("kind, record, words", [
    ("preference", GOOD, "holds chat data"),
    ("pretraining", GOOD, "holds chat data"),
    ("chat", {"prompt": "Q", "chosen": "A", "rejected": "B"}, "for preference pairs use dpo()"),
    ("preference", {"document": "some text"}, "holds pretraining documents"),
])
def test_data_in_another_algorithms_format_is_one_problem(tmp_path, kind, record, words):
    path = write_lines(tmp_path / "data.jsonl", [record] * 30)
    [problem] = problems_of(path, kind=kind).problems
    assert (problem.line, problem.field) == (1, "record") and words in problem.message
