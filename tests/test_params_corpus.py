"""A salted corpus of malformed params files, thrown at ``rlhf check-params``.

Each case damages the repo's params.yaml in one way; where the damage goes (which
key is repeated, which float gets ``.inf``, which line gets a tab) is drawn from a
seeded generator, so every run is a fresh variation of its kind (set
``RLHF_CORPUS_SEED`` for another draw).  Every case must give exit status 2 and
one line on stderr that names the file, and the line where there is one; never a
traceback.  A bug found later adds its case.
"""

from __future__ import annotations

import codecs
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from rlhf_core import cli
from rlhf_core.config import Params, Section

from .conftest import REPO, rlhf

BASE_SEED = int(os.environ.get("RLHF_CORPUS_SEED", "0"))
BASE = (REPO / "params.yaml").read_text()
LINES = BASE.splitlines(keepends=True)


@dataclass
class Case:
    data: bytes
    expected: str  # a fragment of the message
    line: int | None = None  # 1-based line the message must name


def _fields(model=Params, prefix=""):
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _key_lines() -> dict[str, int]:
    """0-based line of every key of the repo's params.yaml, by dotted path."""
    found = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                found[dotted] = key.start_mark.line
                walk(value, dotted + ".")

    walk(yaml.compose(BASE), "")
    return found


KEY_LINES = _key_lines()
LEAVES = [key for key, _ in _fields()]


def _leaves(depth: int, kind: str | None = None) -> list[str]:
    types = dict(_fields())
    return [key for key in LEAVES if key.count(".") == depth - 1 and (kind is None or kind in str(types[key].annotation))]


def _insert_after(line: int, new: str) -> str:
    return "".join(LINES[: line + 1]) + new + "".join(LINES[line + 1 :])


def _replace_value(dotted: str, value: str) -> tuple[str, int]:
    """The repo's params with ``dotted``'s value written as ``value``, and that key's 0-based line."""
    line = KEY_LINES[dotted]
    key = dotted.split(".")[-1]
    head, _, _ = LINES[line].partition(f"{key}:")
    lines = list(LINES)
    lines[line] = f"{head}{key}: {value}\n"
    return "".join(lines), line


# --- the cases: each takes the case's generator and returns the file and what its message must say -----------------


def duplicate_section(rng):
    section = rng.choice(list(Params.model_fields))
    text = BASE + f"\n{section}:\n  {rng.choice(list(Params.model_fields[section].annotation.model_fields))}: 1\n"
    first = KEY_LINES[section] + 1
    return Case(text.encode(), f"duplicate key {section} (first at line {first})", len(text.splitlines()) - 1)


def _duplicate_leaf(rng, depth):
    dotted = rng.choice([key for key in _leaves(depth) if key in KEY_LINES])
    line = KEY_LINES[dotted]
    text = _insert_after(line, LINES[line])
    return Case(text.encode(), f"duplicate key {dotted} (first at line {line + 1})", line + 2)


def duplicate_key(rng):
    return _duplicate_leaf(rng, 2)


def duplicate_nested_key(rng):
    return _duplicate_leaf(rng, 3)


def alias_bomb(rng):
    width, depth = rng.randint(8, 12), rng.randint(8, 10)
    bomb = f"b0: &b0 [{', '.join(['lol'] * width)}]\n" + "".join(
        f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * width)}]\n" for i in range(1, depth)
    )
    target = rng.choice(["evaluate.best_of_n", "paths.metrics", "ppo.updates", "gates.max_kl"])
    text, _ = _replace_value(target, f"*b{depth - 1}")
    return Case((bomb + text).encode(), "YAML aliases expand to more than")


def recursive_alias(rng):
    text, line = _replace_value(rng.choice(["evaluate.best_of_n", "paths.metrics"]), "&loop [*loop]")
    return Case(text.encode(), "recursive YAML alias", line + 1)


def non_finite(rng):
    dotted = rng.choice(_leaves(2, "float") + _leaves(3, "float"))
    text, line = _replace_value(dotted, rng.choice([".inf", "-.inf", ".nan", ".NaN", "+.Inf"]))
    return Case(text.encode(), f"{dotted}: Input should be a finite number", line + 1)


def at_chance(rng):
    dotted = rng.choice(["reward.champion_min_accuracy", "gates.min_reward_accuracy"])
    text, line = _replace_value(dotted, rng.choice(["0.5", "0.0", "0.3"]))
    return Case(text.encode(), f"{dotted}: Input should be greater than 0.5", line + 1)


def wrong_type(rng):
    dotted = rng.choice([key for key in _leaves(2, "int") if "float" not in str(dict(_fields())[key].annotation)])
    text, line = _replace_value(dotted, rng.choice(["many", "[1, 2]", "{a: 1}", "'3 updates'"]))
    return Case(text.encode(), f"{dotted}:", line + 1)


def boolean_for_a_number(rng):
    dotted = rng.choice(_leaves(2, "float") + _leaves(2, "int"))
    word = rng.choice(["true", "false", "yes", "no", "on", "True"])
    text, line = _replace_value(dotted, word)
    return Case(text.encode(), f"{dotted}: Value error, expected a number, got {'true' if word in ('true', 'yes', 'on', 'True') else 'false'}", line + 1)


def unknown_key(rng):
    dotted = rng.choice([key for key in _leaves(2) if key in KEY_LINES and len(key.split(".")[-1]) > 3])
    section, name = dotted.split(".")
    cut = rng.randrange(1, len(name) - 1)
    typo = name[:cut] + name[cut + 1 :]
    line = KEY_LINES[dotted]
    text = _insert_after(line, f"  {typo}: 1\n")
    return Case(text.encode(), f"{section}.{typo}: unknown key", line + 2)


def missing_section(rng):
    section = rng.choice(list(Params.model_fields))
    data = yaml.safe_load(BASE)
    del data[section]
    return Case(yaml.safe_dump(data, sort_keys=False).encode(), f"{section}: required key is missing")


def section_not_a_mapping(rng):
    section = rng.choice(list(Params.model_fields))
    text, line = _replace_value(section, rng.choice(["3", "[a, b]", "text"]))
    end = next((i for i in range(line + 1, len(LINES)) if LINES[i][:1] not in (" ", "\n")), len(LINES))
    text = "".join(text.splitlines(keepends=True)[: line + 1]) + "".join(LINES[end:])
    return Case(text.encode(), f"{section}:", line + 1)


def bad_yaml(rng):
    text, line = _replace_value(rng.choice(["evaluate.best_of_n", "paths.metrics", "ppo.updates"]), "[1, 2")
    return Case(text.encode(), "not valid YAML")


def tab_indent(rng):
    line = rng.choice([i for i, text in enumerate(LINES) if text.startswith("  ") and not text.strip().startswith("#")])
    lines = list(LINES)
    lines[line] = "\t" + lines[line][2:]
    return Case("".join(lines).encode(), "YAML forbids tabs", line + 1)


def empty(rng):
    return Case(rng.choice([b"", b"\n\n", b"   \n", b"# nothing here\n"]), "empty")


def list_at_top(rng):
    return Case(rng.choice([b"- paths\n- ppo\n", b"[1, 2, 3]\n"]), "expected a mapping of sections")


def scalar_at_top(rng):
    return Case(rng.choice([b"just some text\n", b"42\n", b"null\n"]), "expected a mapping of sections")


def bom_then_error(rng):
    dotted = rng.choice(_leaves(2, "float"))
    text, line = _replace_value(dotted, ".inf")
    return Case(codecs.BOM_UTF8 + text.encode(), f"{dotted}: Input should be a finite number", line + 1)


def utf16_or_32(rng):
    encoding, name = rng.choice([("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
    return Case(BASE.encode(encoding), f"encoded as {name}")


def utf16_without_bom(rng):
    return Case(BASE.encode(rng.choice(["utf-16-le", "utf-16-be"])), "contains NUL bytes")


def not_utf8(rng):
    line = rng.choice([i for i, text in enumerate(LINES) if "#" in text])
    lines = [text.encode() for text in LINES]
    lines[line] = lines[line].replace(b"#", "# caf\xe9 ".encode("latin-1"), 1)
    return Case(b"".join(lines), "not UTF-8 (byte 0xe9)", line + 1)


def deep_nesting(rng):
    depth = rng.randint(20_000, 60_000)
    return Case(b"a: " + b"[" * depth + b"]" * depth + b"\n", "nested too deeply")


def huge_integer(rng):
    dotted = rng.choice(_leaves(2, "int"))
    text, line = _replace_value(dotted, "9" * rng.randint(4400, 6000))
    return Case(text.encode(), "unreadable value", line + 1)


def impossible_date(rng):
    text, line = _replace_value("orchestration.schedule_cron", rng.choice(["2001-13-45", "2026-02-30"]))
    return Case(text.encode(), "unreadable value", line + 1)


def two_documents(rng):
    return Case((BASE + "---\npaths: {}\n").encode(), "not valid YAML")


def python_tag(rng):
    text, line = _replace_value(rng.choice(["paths.metrics", "ppo.updates"]), "!!python/object/apply:os.system [ls]")
    return Case(text.encode(), "not valid YAML", line + 1)


CASES: dict[str, Callable[[random.Random], Case]] = {
    fn.__name__: fn
    for fn in (
        duplicate_section, duplicate_key, duplicate_nested_key, alias_bomb, recursive_alias, non_finite, at_chance,
        wrong_type, boolean_for_a_number, unknown_key, missing_section, section_not_a_mapping, bad_yaml, tab_indent, empty, list_at_top,
        scalar_at_top, bom_then_error, utf16_or_32, utf16_without_bom, not_utf8, deep_nesting, huge_integer,
        impossible_date, two_documents, python_tag,
    )
}


def check_params(path: Path, capsys) -> tuple[int, list[str]]:
    status = cli.main(["check-params", "--params", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unexpected error" not in err, err
    return status, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("name", CASES)
def test_malformed_params_file_is_one_line_and_exit_2(work_env, capsys, name):
    case = CASES[name](random.Random(f"{BASE_SEED}:{name}"))
    path = work_env / f"{name}.yaml"
    path.write_bytes(case.data)
    status, lines = check_params(path, capsys)
    assert status == 2 and len(lines) == 1, lines
    message = lines[0]
    assert f"{path}{':' if case.line is None else f':{case.line}:'}" in message, (message, case.line)
    assert case.expected in message, message


@pytest.mark.parametrize("prefix", [b"", codecs.BOM_UTF8])
def test_valid_params_file_passes(work_env, capsys, prefix):
    path = work_env / "good.yaml"
    path.write_bytes(prefix + BASE.encode())
    assert check_params(path, capsys) == (0, [])


def test_unreadable_path_is_one_line(work_env, capsys):
    for path in (work_env / "missing.yaml", work_env):
        status, lines = check_params(path, capsys)
        assert status == 2 and len(lines) == 1 and str(path) in lines[0] and "cannot read" in lines[0], lines


def test_console_script_on_a_salted_bad_file(work_env):
    """The installed ``rlhf`` command, as a user runs it: same one line, status 2."""
    rng = random.Random(f"{BASE_SEED}:console")
    name = rng.choice(sorted(CASES))
    path = work_env / f"{name}.yaml"
    path.write_bytes(CASES[name](rng).data)
    done = rlhf("check-params", "--params", str(path), cwd=work_env, check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and str(path) in lines[0] and "Traceback" not in done.stderr, done.stderr
