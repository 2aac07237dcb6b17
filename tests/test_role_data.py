"""Tests for pipeline/role_schema.py and the role data shipped in data/."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from pipeline.role_schema import (
    DATA_DIR,
    DEFAULT_ROLE_NAME,
    CatalogEntry,
    Question,
    Role,
    RoleDataError,
    RoleSet,
    find_duplicate_names,
    format_eval_prompt,
    load_catalog,
    load_questions,
    load_role_dir,
    load_role_file,
    role_to_dict,
    shipped_role_set,
    validate_role_dict,
    write_role_file,
)

ROLES_DIR = DATA_DIR / "roles"
QUESTIONS_FILE = DATA_DIR / "extraction_questions.jsonl"
CATALOG_FILE = DATA_DIR / "role_catalog.jsonl"

ROLE_FILES = sorted(ROLES_DIR.glob("*.json"))
CHARACTER_FILES = [p for p in ROLE_FILES if p.stem != DEFAULT_ROLE_NAME]

MODEL_NAMES = re.compile(
    r"\b(claude|gpt|chatgpt|llama|gemma|gemini|qwen|mistral|mixtral|phi|deepseek|"
    r"anthropic|openai)\b",
    re.IGNORECASE,
)
CATEGORIES = {
    "assistant-like", "profession", "creative", "social",
    "fantastical", "non-human", "abstract", "archetype",
}
STOPWORDS = set(
    "a an the of to in on at for from by with about and or is are was be been it its "
    "this that what which who whom how why when where do does did you your yours "
    "would could should will can if me my i".split()
)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in _norm(text).split() if w not in STOPWORDS)


def _jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


# --------------------------------------------------------------------------
# helpers for building test fixtures
# --------------------------------------------------------------------------

EVAL = (
    "Judge whether the answer sounds like a sea captain.\n"
    "Question: {question}\nAnswer: {answer}\n"
    "Reply with only the single digit score."
)


def role_dict(n_instructions: int = 5, **overrides) -> dict:
    data = {
        "instruction": [{"pos": f"You are a sea captain, version {i}."} for i in range(n_instructions)],
        "questions": ["What is your ship called?", "Where are you sailing next?"],
        "eval_prompt": EVAL,
    }
    data.update(overrides)
    return data


DEFAULT_DICT = {
    "instruction": [
        {"pos": ""},
        {"pos": "You are an AI assistant."},
        {"pos": "You are {model_name}."},
    ],
    "questions": [],
    "eval_prompt": None,
}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def write_questions(path: Path, texts: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": i, "question": q}) + "\n" for i, q in enumerate(texts)),
        encoding="utf-8",
    )
    return path


def make_paper_layout(root: Path, questions_in: str = "parent") -> Path:
    """data-like folder: <root>/roles/*.json and extraction_questions.jsonl."""
    roles = root / "roles"
    roles.mkdir(parents=True)
    write_json(roles / "default.json", DEFAULT_DICT)
    write_json(roles / "captain.json", role_dict())
    write_json(
        roles / "ghost.json",
        role_dict(
            instruction=[{"pos": f"You are a ghost ({i})."} for i in range(5)],
            questions=["Why do you haunt this house?"],
        ),
    )
    (roles / "notes.txt").write_text("not a role", encoding="utf-8")
    qdir = root if questions_in == "parent" else roles
    write_questions(qdir / "extraction_questions.jsonl", ["What do you value?", "Where is home?"])
    return roles


# --------------------------------------------------------------------------
# shipped data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROLE_FILES, ids=lambda p: p.stem)
def test_every_shipped_role_file_validates(path: Path) -> None:
    role = load_role_file(path)
    assert role.name == path.stem
    assert role.source == str(path)
    assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", role.name)


def test_shipped_role_set_loads_with_at_least_30_full_roles() -> None:
    rs = shipped_role_set()
    assert isinstance(rs, RoleSet)
    assert DEFAULT_ROLE_NAME not in rs.roles
    assert len(rs.roles) >= 30
    assert len(CHARACTER_FILES) == len(rs.roles)
    for role in rs.roles.values():
        assert len(role.instructions) == 5
        assert len(set(role.instructions)) == 5, f"{role.name}: instructions repeat"
        assert len(role.questions) == 40, f"{role.name}: {len(role.questions)} questions"
        assert len({_norm(q) for q in role.questions}) == 40
        assert role.eval_prompt is not None


def test_shipped_role_questions_and_prompts_are_not_reused_between_roles() -> None:
    rs = shipped_role_set()
    seen_prompts: dict[str, str] = {}
    for role in rs.roles.values():
        for p in role.instructions:
            key = _norm(p)
            assert key not in seen_prompts, f"{role.name} reuses a prompt of {seen_prompts.get(key)}"
            seen_prompts[key] = role.name
        for p in role.instructions:
            assert p.startswith("You are") or p.startswith("Be ") or p.startswith("Take on"), p
    eval_prompts = [r.eval_prompt for r in rs.roles.values()]
    assert len(set(eval_prompts)) == len(eval_prompts), "eval prompts must be role-specific"


def test_default_role_has_the_five_neutral_prompts() -> None:
    default = shipped_role_set().default
    assert default.name == DEFAULT_ROLE_NAME
    assert default.instructions == (
        "",
        "You are an AI assistant.",
        "You are a large language model.",
        "You are {model_name}.",
        "Respond as yourself.",
    )
    assert default.questions == ()
    assert default.eval_prompt is None
    prompts = default.system_prompts("TestModel-7B")
    assert prompts[3] == "You are TestModel-7B."
    assert prompts[0] == ""
    assert all("{model_name}" not in p for p in prompts)


def test_extraction_questions_are_240_unique_and_varied() -> None:
    questions = load_questions(QUESTIONS_FILE)
    assert len(questions) == 240
    assert all(isinstance(q, Question) for q in questions)
    assert [q.id for q in questions] == list(range(240))
    texts = [q.question for q in questions]
    assert len({_norm(t) for t in texts}) == 240
    assert all(t.strip() == t and t.endswith(("?", ".")) for t in texts)
    # no near-duplicates: content-word overlap stays well below identity
    words = [_content_words(t) for t in texts]
    close = [
        (texts[i], texts[j])
        for i, j in itertools.combinations(range(len(texts)), 2)
        if _jaccard(words[i], words[j]) >= 0.75
    ]
    assert not close, close
    # they are general questions: none mention a specific shipped role by name
    role_names = {p.stem for p in CHARACTER_FILES} - {"void", "ocean"}
    for t in texts:
        assert not (set(_norm(t).split()) & role_names), t


def test_extraction_questions_file_has_exactly_240_lines() -> None:
    lines = QUESTIONS_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 240
    for line in lines:
        obj = json.loads(line)
        assert set(obj) == {"id", "question"}


def test_catalog_is_large_unique_and_covers_shipped_roles() -> None:
    catalog = load_catalog()
    assert catalog == load_catalog(CATALOG_FILE)
    assert all(isinstance(e, CatalogEntry) for e in catalog)
    names = [e.name for e in catalog]
    assert len(names) >= 275
    assert len({n.lower() for n in names}) == len(names)
    assert find_duplicate_names(names) == []
    shipped = {p.stem for p in CHARACTER_FILES}
    assert shipped <= set(names), shipped - set(names)
    assert DEFAULT_ROLE_NAME not in names
    for e in catalog:
        assert e.category in CATEGORIES, e
        assert "\n" not in e.description and e.description.endswith(".")
        assert len(e.description.split()) >= 5
    assert {e.category for e in catalog} == CATEGORIES
    descriptions = [_norm(e.description) for e in catalog]
    assert len(set(descriptions)) == len(descriptions)


@pytest.mark.parametrize("path", CHARACTER_FILES, ids=lambda p: p.stem)
def test_eval_prompts_have_placeholders_rubric_and_no_model_name(path: Path) -> None:
    role = load_role_file(path)
    ev = role.eval_prompt
    assert ev is not None
    assert ev.count("{question}") == 1 and ev.count("{answer}") == 1
    assert not MODEL_NAMES.search(ev), MODEL_NAMES.search(ev)
    for p in role.instructions:
        assert not MODEL_NAMES.search(p)
    for score in "0123":
        assert re.search(rf"^{score} = ", ev, re.MULTILINE), f"rubric line {score} missing"
    assert "refuse" in ev
    assert ev.rstrip().endswith("Reply with only the single digit score (0, 1, 2 or 3) and nothing else.")
    # no other brace placeholders that the filler would leave behind
    assert set(re.findall(r"\{[^{}]*\}", ev)) == {"{question}", "{answer}"}
    filled = format_eval_prompt(role, "Q", "A")
    assert "{question}" not in filled and "{answer}" not in filled


def test_role_to_dict_is_inverse_of_validate_for_shipped_roles() -> None:
    for path in ROLE_FILES:
        role = load_role_file(path)
        on_disk = json.loads(path.read_text(encoding="utf-8"))
        assert role_to_dict(role) == on_disk
        again = validate_role_dict(role.name, role_to_dict(role), role.source)
        assert again == role


# --------------------------------------------------------------------------
# validation errors name the file and the field
# --------------------------------------------------------------------------


def _error(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / f"{name}.json"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        write_json(path, content)
    with pytest.raises(RoleDataError) as info:
        load_role_file(path)
    msg = str(info.value)
    assert str(path) in msg
    return msg


def test_invalid_json_reports_file_line_and_column(tmp_path: Path) -> None:
    msg = _error(tmp_path, "broken", '{\n  "instruction": [\n    {"pos": "x"},,\n  ]\n}\n')
    assert "invalid JSON" in msg
    assert "line 3" in msg and "column" in msg


def test_missing_eval_prompt_is_named(tmp_path: Path) -> None:
    data = role_dict()
    del data["eval_prompt"]
    msg = _error(tmp_path, "captain", data)
    assert "'eval_prompt'" in msg


def test_null_eval_prompt_only_allowed_for_default(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", role_dict(eval_prompt=None))
    assert "'eval_prompt'" in msg
    default = validate_role_dict("default", DEFAULT_DICT, "mem/default.json")
    assert default.eval_prompt is None


def test_eval_prompt_without_placeholders_is_rejected(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", role_dict(eval_prompt="Rate it: {question}"))
    assert "'eval_prompt'" in msg and "{answer}" in msg


def test_four_instructions_instead_of_five(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", role_dict(n_instructions=4))
    assert "'instruction'" in msg
    assert "5" in msg and "4" in msg


def test_empty_instruction_pos_names_the_index(tmp_path: Path) -> None:
    data = role_dict()
    data["instruction"][2]["pos"] = "   "
    msg = _error(tmp_path, "pirate", data)
    assert msg == f"{tmp_path / 'pirate.json'}: field 'instruction'[2].pos must be a non-empty string"


def test_non_string_question_names_the_index(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", role_dict(questions=["Where to?", 42]))
    assert "'questions'[1]" in msg and "string" in msg


def test_duplicate_role_question_is_rejected(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", role_dict(questions=["Where to?", "where to"]))
    assert "'questions'[1]" in msg and "duplicate" in msg


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", role_dict(persona_notes="salty"))
    assert "'persona_notes'" in msg and "unknown" in msg


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", ["not", "an", "object"])
    assert "object" in msg


def test_character_role_needs_questions(tmp_path: Path) -> None:
    msg = _error(tmp_path, "captain", role_dict(questions=[]))
    assert "'questions'" in msg


def test_default_role_rules_are_relaxed_but_checked() -> None:
    role = validate_role_dict("default", {"instruction": [{"pos": ""}]}, "x/default.json")
    assert role.instructions == ("",) and role.questions == () and role.eval_prompt is None
    with pytest.raises(RoleDataError, match=r"x/default\.json: field 'instruction'"):
        validate_role_dict("default", {"instruction": []}, "x/default.json")
    with pytest.raises(RoleDataError, match=r"'instruction'\[0\]\.pos"):
        validate_role_dict("default", {"instruction": [{"pos": 3}]}, "x/default.json")


def test_bad_role_name_is_rejected() -> None:
    with pytest.raises(RoleDataError, match="name"):
        validate_role_dict("Sea Captain", role_dict(), "x/Sea Captain.json")


# --------------------------------------------------------------------------
# duplicate names
# --------------------------------------------------------------------------


def test_find_duplicate_names_is_case_insensitive() -> None:
    assert find_duplicate_names(["Diplomat", "diplomat", "pirate", "ghost", "ghost"]) == [
        "diplomat",
        "ghost",
    ]
    assert find_duplicate_names(["a", "b"]) == []
    assert find_duplicate_names([]) == []


def test_duplicate_role_files_in_a_folder_are_rejected(tmp_path: Path) -> None:
    roles = make_paper_layout(tmp_path)
    write_json(roles / "Diplomat.json", role_dict())
    write_json(roles / "diplomat.json", role_dict())
    if len(list(roles.glob("*iplomat.json"))) < 2:
        pytest.skip("case-insensitive file system")
    with pytest.raises(RoleDataError) as info:
        load_role_dir(roles)
    msg = str(info.value)
    assert str(roles) in msg and "duplicate" in msg
    assert "Diplomat.json" in msg and "diplomat.json" in msg


def test_duplicate_catalog_names_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "catalog.jsonl"
    rows = [
        {"name": "pirate", "category": "fantastical", "description": "A pirate."},
        {"name": "ghost", "category": "fantastical", "description": "A ghost."},
        {"name": "pirate", "category": "fantastical", "description": "Another pirate."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(RoleDataError) as info:
        load_catalog(path)
    msg = str(info.value)
    assert str(path) in msg and "'pirate'" in msg and "lines 1 and 3" in msg


def test_catalog_line_errors_carry_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "catalog.jsonl"
    path.write_text(
        json.dumps({"name": "pirate", "category": "fantastical", "description": "A pirate."})
        + "\n"
        + json.dumps({"name": "ghost", "category": "fantastical"})
        + "\n",
        encoding="utf-8",
    )
    with pytest.raises(RoleDataError, match=r"catalog\.jsonl:2: field 'description'"):
        load_catalog(path)


# --------------------------------------------------------------------------
# questions file
# --------------------------------------------------------------------------


def test_load_questions_rejects_duplicate_ids_with_line_number(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": 0, "question": "What do you value?"}\n'
        '{"id": 1, "question": "Where is home?"}\n'
        '{"id": 0, "question": "What frightens you?"}\n',
        encoding="utf-8",
    )
    with pytest.raises(RoleDataError, match=r"q\.jsonl:3: field 'id'.*line 1"):
        load_questions(path)


def test_load_questions_rejects_duplicate_texts(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": 0, "question": "Where is home?"}\n'
        '{"id": 1, "question": "where is HOME"}\n',
        encoding="utf-8",
    )
    with pytest.raises(RoleDataError, match=r"q\.jsonl:2: field 'question'"):
        load_questions(path)


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"id": "0", "question": "Where is home?"}', "'id'"),
        ('{"id": true, "question": "Where is home?"}', "'id'"),
        ('{"id": 0, "question": ""}', "'question'"),
        ('{"id": 0}', "'question'"),
        ('{"id": 0, "question": "Where?", "tag": 1}', "'tag'"),
        ('{"id": 0, "question": "Where?"', "invalid JSON"),
        ('[0, "Where?"]', "object"),
    ],
)
def test_load_questions_line_errors(tmp_path: Path, line: str, field: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 5, "question": "What do you value?"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(RoleDataError) as info:
        load_questions(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:2:")
    assert field in msg


def test_load_questions_skips_blank_lines_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"id": 7, "question": "B?"}\n\n{"id": 3, "question": "A?"}\n', encoding="utf-8"
    )
    assert load_questions(path) == (Question(7, "B?"), Question(3, "A?"))


# --------------------------------------------------------------------------
# role directories
# --------------------------------------------------------------------------


def test_load_role_dir_in_paper_layout_questions_in_parent(tmp_path: Path) -> None:
    roles = make_paper_layout(tmp_path, questions_in="parent")
    rs = load_role_dir(roles)
    assert sorted(rs.roles) == ["captain", "ghost"]
    assert rs.default.name == "default"
    assert rs.default.system_prompts("M") == ["", "You are an AI assistant.", "You are M."]
    assert [q.question for q in rs.questions] == ["What do you value?", "Where is home?"]
    assert rs.roles["ghost"].questions == ("Why do you haunt this house?",)
    assert rs.roles["captain"].source == str(roles / "captain.json")


def test_load_role_dir_questions_in_folder_or_explicit(tmp_path: Path) -> None:
    roles = make_paper_layout(tmp_path / "a", questions_in="folder")
    assert len(load_role_dir(roles).questions) == 2

    roles_b = make_paper_layout(tmp_path / "b")
    other = write_questions(tmp_path / "other.jsonl", ["One?", "Two?", "Three?"])
    rs = load_role_dir(roles_b, questions_path=other)
    assert [q.id for q in rs.questions] == [0, 1, 2]


def test_load_role_dir_requires_questions_and_default(tmp_path: Path) -> None:
    roles = make_paper_layout(tmp_path)
    (tmp_path / "extraction_questions.jsonl").unlink()
    with pytest.raises(RoleDataError, match="extraction_questions.jsonl"):
        load_role_dir(roles)

    other = tmp_path / "other"
    roles2 = make_paper_layout(other)
    (roles2 / "default.json").unlink()
    with pytest.raises(RoleDataError, match="default"):
        load_role_dir(roles2)


def test_load_role_dir_reports_the_bad_file(tmp_path: Path) -> None:
    roles = make_paper_layout(tmp_path)
    write_json(roles / "ghost.json", role_dict(n_instructions=4))
    with pytest.raises(RoleDataError) as info:
        load_role_dir(roles)
    assert str(roles / "ghost.json") in str(info.value)


def test_select_returns_subset_and_rejects_unknown_names(tmp_path: Path) -> None:
    rs = load_role_dir(make_paper_layout(tmp_path))
    sub = rs.select(["ghost"])
    assert list(sub.roles) == ["ghost"]
    assert sub.default == rs.default and sub.questions == rs.questions
    assert rs.select(None) is rs
    assert list(rs.select(["ghost", "default", "captain", "ghost"]).roles) == ["ghost", "captain"]
    with pytest.raises(RoleDataError) as info:
        rs.select(["ghost", "wizard", "kraken"])
    assert "wizard" in str(info.value) and "kraken" in str(info.value)


def test_shipped_select() -> None:
    rs = shipped_role_set()
    sub = rs.select(["pirate", "tutor"])
    assert list(sub.roles) == ["pirate", "tutor"]
    assert len(sub.questions) == 240


# --------------------------------------------------------------------------
# eval prompt formatting and writing
# --------------------------------------------------------------------------


def test_format_eval_prompt_leaves_braces_in_answer_alone() -> None:
    role = validate_role_dict("captain", role_dict(), "mem/captain.json")
    answer = 'Arr, {"treasure": 3} and {0} and {answer} and {question} and }{'
    question = "What is in {the} chest? {answer}"
    filled = format_eval_prompt(role, question, answer)
    assert f"Question: {question}\n" in filled
    assert f"Answer: {answer}\n" in filled
    assert filled.count(answer) == 1


def test_format_eval_prompt_on_default_role_fails() -> None:
    default = validate_role_dict("default", DEFAULT_DICT, "mem/default.json")
    with pytest.raises(RoleDataError, match="eval_prompt"):
        format_eval_prompt(default, "q", "a")


def test_write_role_file_round_trip(tmp_path: Path) -> None:
    role = validate_role_dict(
        "captain",
        role_dict(questions=["Where to, captain?", "Ünïcode and {braces}?"]),
        "mem/captain.json",
    )
    path = tmp_path / "captain.json"
    write_role_file(path, role)
    loaded = load_role_file(path)
    assert loaded.name == role.name
    assert loaded.instructions == role.instructions
    assert loaded.questions == role.questions
    assert loaded.eval_prompt == role.eval_prompt
    assert loaded.source == str(path)
    assert json.loads(path.read_text(encoding="utf-8")) == role_to_dict(role)
    assert [p.name for p in tmp_path.iterdir()] == ["captain.json"]

    # overwriting replaces the content and leaves no temporary files behind
    changed = Role(
        name="captain",
        instructions=role.instructions,
        questions=["Only one question now?"],
        eval_prompt=role.eval_prompt,
    )
    write_role_file(path, changed)
    assert load_role_file(path).questions == ("Only one question now?",)
    assert [p.name for p in tmp_path.iterdir()] == ["captain.json"]


def test_write_role_file_round_trip_for_default(tmp_path: Path) -> None:
    default = load_role_file(ROLES_DIR / "default.json")
    write_role_file(tmp_path / "default.json", default)
    assert load_role_file(tmp_path / "default.json").instructions == default.instructions


def test_write_role_file_refuses_invalid_role_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "captain.json"
    good = validate_role_dict("captain", role_dict(), "mem/captain.json")
    write_role_file(path, good)
    before = path.read_bytes()
    bad = Role(name="captain", instructions=good.instructions[:4], questions=good.questions,
               eval_prompt=good.eval_prompt)
    with pytest.raises(RoleDataError, match="'instruction'"):
        write_role_file(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["captain.json"]
    with pytest.raises(RoleDataError):
        write_role_file(tmp_path / "other_name.json", good)


def test_role_is_frozen_and_stores_tuples() -> None:
    role = Role(name="x", instructions=["a"], questions=["b"], eval_prompt=None)
    assert role.instructions == ("a",) and role.questions == ("b",)
    with pytest.raises(AttributeError):
        role.name = "y"  # type: ignore[misc]
