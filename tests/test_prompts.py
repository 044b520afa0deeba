"""The prompts CSV (prompt,classname,classidx) and --classes/--template."""

import pytest

from diffcls.errors import DiffclsError
from diffcls.runtime.data.prompts import PromptSet


def write(tmp_path, text, name="prompts.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_reference_format_with_shared_classidx(tmp_path):
    p = write(tmp_path, 'prompt,classname,classidx\na photo of a cat.,cat,0\n"a cat, sitting",cat,0\na dog.,dog,1\n')
    ps = PromptSet.from_csv(p)
    assert ps.prompts == ("a photo of a cat.", "a cat, sitting", "a dog.")
    assert ps.classidx == (0, 0, 1)
    assert ps.classes == {0: "cat", 1: "dog"}


def test_from_classes_with_template():
    ps = PromptSet.from_classes("cat, dog", "a {} here")
    assert ps.prompts == ("a cat here", "a dog here") and ps.classidx == (0, 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("text,label\na,b\n", "must have the columns prompt,classname,classidx"),
        ("prompt,classname,classidx\n", "no prompts"),
        ("prompt,classname,classidx\na cat,cat,zero\n", "is not an integer"),
        ("prompt,classname,classidx\na cat,cat,0,extra\n", "line 2 has 4 fields"),
        ("prompt,classname,classidx\na cat,cat,0\na dog,dog,0\n", "named both"),
        ("prompt,classname,classidx\na cat,cat,0\nthe cat,cat,1\n", "class names must be unique"),
        ("prompt,classname,classidx\na cat,cat,0\na cat,cat,0\n", "repeats the prompt"),
        ("prompt,classname,classidx\n,cat,0\n", "empty prompt"),
    ],
)
def test_malformed_csv(tmp_path, text, message):
    p = write(tmp_path, text)
    with pytest.raises(DiffclsError, match=message) as e:
        PromptSet.from_csv(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(DiffclsError, match="does not exist"):
        PromptSet.from_csv(tmp_path / "nope.csv")
    p = tmp_path / "bin.csv"
    p.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DiffclsError, match="UTF-8"):
        PromptSet.from_csv(p)


def test_duplicate_and_empty_class_names():
    with pytest.raises(DiffclsError, match="cat more than once"):
        PromptSet.from_classes("cat,dog,cat")
    with pytest.raises(DiffclsError, match="empty name"):
        PromptSet.from_classes("cat,,dog")
    with pytest.raises(DiffclsError, match="no {}"):
        PromptSet.from_classes("cat,dog", "a photo")
