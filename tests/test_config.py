from pathlib import Path

import pytest
import yaml

from rlhf_core.config import Params, Section, load_params, set_params, with_overrides
from rlhf_core.errors import ConfigError

from .conftest import REPO, rlhf


def test_repo_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.candidates.k >= 2
    assert params.ppo.minibatch_size * params.ppo.minibatches == params.ppo.batch_size


def test_every_dvc_params_section_exists_in_the_model():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    sections = set(Params.model_fields)
    named = set()
    for stage in dvc["stages"].values():
        for entry in stage.get("params", []):
            names = entry if isinstance(entry, str) else next(iter(entry.values()))
            named.update([names] if isinstance(names, str) else names)
    assert named, "dvc.yaml names no params sections"
    assert {n.split(".")[0] for n in named} <= sections, f"dvc.yaml names sections the config does not know: {named}"
    for name in (n for n in named if "." in n):  # a single key of a section, e.g. labeling.backend
        section, key = name.split(".", 1)
        assert key in Params.model_fields[section].annotation.model_fields, f"dvc.yaml names unknown key {name}"


def test_every_dvc_path_variable_is_a_paths_key():
    import re

    text = (REPO / "dvc.yaml").read_text()
    used = set(re.findall(r"\$\{paths\.(\w+)\}", text))
    assert used and used <= set(load_params(REPO / "params.yaml").paths.model_fields)


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_misspelt_key_names_file_line_and_key(tmp_path):
    path = _write(tmp_path, lambda d: d["ppo"].update({"lerning_rate": 1e-5}))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.count("\n") == 0
    assert "ppo.lerning_rate" in message and "unknown key" in message and str(path) in message
    line = int(message.split(":")[1])
    assert "lerning_rate" in path.read_text().splitlines()[line - 1]


def test_ill_typed_value_is_reported(tmp_path):
    path = _write(tmp_path, lambda d: d["candidates"].update({"k": "four"}))
    with pytest.raises(ConfigError, match=r"candidates\.k"):
        load_params(path)


def test_cross_field_rule(tmp_path):
    path = _write(tmp_path, lambda d: d["ppo"].update({"batch_size": 8, "minibatches": 3}))
    with pytest.raises(ConfigError, match="divisible"):
        load_params(path)


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("paths: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path / "nope.yaml")


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    path = _write(tmp_path, lambda d: d["reward"].update({"epohcs": 2}))
    done = rlhf("check-params", "--params", str(path), cwd=tmp_path, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "reward.epohcs" in lines[0] and "unknown key" in lines[0]


def test_cli_help_lists_stages(tmp_path):
    done = rlhf("--help", cwd=tmp_path)
    for command in ("base-model", "prompts", "check-params"):
        assert command in done.stdout


# --- one home for every value ---------------------------------------------------------------------------------------


def _fields(model, prefix=""):
    """(dotted key, field) of every value of the params model, at any depth."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return _ABSENT
        data = data[part]
    return data


_ABSENT = object()


def test_params_yaml_writes_every_value_and_no_code_default_differs():
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    loaded = load_params(REPO / "params.yaml").model_dump()  # values as the model reads them (a YAML list as a tuple)
    absent, differ = [], []
    for dotted, field in _fields(Params):
        if _lookup(written, dotted) is _ABSENT:
            absent.append(dotted)
        elif not field.is_required() and (default := field.get_default(call_default_factory=True)) != _lookup(loaded, dotted):
            differ.append(f"{dotted}: code {default!r}, params.yaml {_lookup(loaded, dotted)!r}")
    assert not absent, f"params.yaml leaves these to code defaults: {absent}"
    assert not differ, "code defaults differ from params.yaml:\n" + "\n".join(differ)


# --- what load_params refuses ---------------------------------------------------------------------------------------


def _text_with(tmp_path: Path, old: str, new: str, base: str | None = None) -> Path:
    text = base if base is not None else (REPO / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def _one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


@pytest.mark.parametrize(("old", "new", "key", "first", "second"), [
    ("\nppo:\n", "\nppo:\n  updates: 3\nppo:\n", "ppo", "ppo:", "ppo:"),
    ("  k: 4\n", "  k: 4\n  k: 5\n", "candidates.k", "  k: 4", "  k: 5"),
    ("    beta: 0.2\n", "    beta: 0.2\n    beta: 0.3\n", "ppo.kl.beta", "    beta: 0.2", "    beta: 0.3"),
    ("    seed: 0\n", "    seed: 0\n    seed: 1\n", "base_model.tiny.seed", "    seed: 0", "    seed: 1"),
])
def test_duplicate_key_names_both_lines(tmp_path, old, new, key, first, second):
    path = _text_with(tmp_path, old, new)
    lines = path.read_text().splitlines()
    first_line = lines.index(first) + 1
    second_line = lines.index(second, first_line) + 1
    message = _one_line_error(path)
    assert f"{path}:{second_line}: duplicate key {key} (first at line {first_line})" in message


_BOMB = "".join(
    [f"l0: &l0 [{', '.join(['lol'] * 9)}]\n"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)]
)


@pytest.mark.parametrize(("old", "new"), [
    ("best_of_n: [1, 2, 4, 8, 16]", "best_of_n: *l9"),
    ("  metrics: metrics", "  metrics: *l9"),
])
def test_alias_bomb_is_one_line_fast_and_small(tmp_path, old, new):
    import time
    import tracemalloc

    path = _text_with(tmp_path, old, new, base=_BOMB + (REPO / "params.yaml").read_text())
    tracemalloc.start()
    start = time.perf_counter()
    message = _one_line_error(path)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "alias" in message and elapsed < 0.5 and peak < 20 * 2**20, (message, elapsed, peak)


def test_recursive_alias_is_refused(tmp_path):
    path = _text_with(tmp_path, "best_of_n: [1, 2, 4, 8, 16]", "best_of_n: &loop [*loop]")
    assert "recursive YAML alias" in _one_line_error(path)


def _float_fields() -> list[str]:
    return [dotted for dotted, field in _fields(Params) if "float" in str(field.annotation)]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_in_every_float_field(tmp_path, value):
    keys = _float_fields()
    assert len(keys) > 20 and "ppo.kl.beta" in keys and "ppo.missing_eos_penalty" in keys
    for dotted in keys:
        data = yaml.safe_load((REPO / "params.yaml").read_text())
        *sections, name = dotted.split(".")
        target = data
        for section in sections:
            target = target[section]
        target[name] = float(value.replace(".", ""))
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        message = _one_line_error(path)
        assert dotted in message and "finite" in message, message


@pytest.mark.parametrize("key", ["reward.champion_min_accuracy", "gates.min_reward_accuracy"])
def test_accuracy_bars_must_exceed_chance(tmp_path, key):
    section, name = key.split(".")
    for value, ok in ((0.0, False), (0.5, False), (0.51, True)):
        path = _write(tmp_path, lambda d: d[section].update({name: value}))
        if ok:
            assert getattr(getattr(load_params(path), section), name) == value
        else:
            assert key in _one_line_error(path)


@pytest.mark.parametrize(("data", "expected"), [
    (b"", "empty"),
    (b"# only a comment\n", "empty"),
    (b"- paths\n- ppo\n", "expected a mapping of sections"),
    ("paths:\n  prompts: d\xe9ta\n".encode("latin-1"), ":2: not UTF-8 (byte 0xe9)"),
    ("paths: {}\n".encode("utf-16"), "encoded as UTF-16"),
    ("paths: {}\n".encode("utf-16-le"), ":1: contains NUL bytes"),
    (b"paths:\n\tprompts: x\n", ":2: not valid YAML (found character '\\t'"),
    (b"a: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
    (b"ppo:\n  updates: " + b"9" * 5000 + b"\n", ":2: not valid YAML (unreadable value"),
])
def test_unreadable_files_give_one_line(tmp_path, data, expected):
    path = tmp_path / "params.yaml"
    path.write_bytes(data)
    assert expected in _one_line_error(path)


def test_utf8_byte_order_mark_is_read_and_lines_still_count(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("\ufeff" + (REPO / "params.yaml").read_text())
    assert load_params(path).candidates.k == load_params(REPO / "params.yaml").candidates.k
    path.write_text("\ufeff" + (REPO / "params.yaml").read_text().replace("  k: 4", "  k: four"))
    line = int(_one_line_error(path).split(":")[1])
    assert "k: four" in path.read_text().splitlines()[line - 1]


# --- overrides ------------------------------------------------------------------------------------------------------


REPO_PARAMS = load_params(REPO / "params.yaml")


def test_override_reaches_nested_keys_at_any_depth_in_memory():
    before = (REPO / "params.yaml").read_bytes()
    params = with_overrides(REPO_PARAMS, {"ppo.kl.beta": "0.3", "base_model.tiny.seed": "7", "evaluate.best_of_n": "[1, 4]"})
    assert (params.ppo.kl.beta, params.base_model.tiny.seed, params.evaluate.best_of_n) == (0.3, 7, [1, 4])
    assert params.ppo.kl.target == REPO_PARAMS.ppo.kl.target and params.ppo.updates == REPO_PARAMS.ppo.updates
    assert (REPO / "params.yaml").read_bytes() == before


@pytest.mark.parametrize(("key", "existing"), [
    ("ppo.beta", "ppo.kl.beta"),
    ("base_model.seed", "base_model.tiny.seed"),
    ("ppo.lerning_rate", "ppo.learning_rate"),
    ("gates.max_kll", "gates.max_kl"),
])
def test_override_of_a_missing_key_names_the_existing_one(key, existing):
    with pytest.raises(ConfigError) as info:
        with_overrides(REPO_PARAMS, {key: "0.1"})
    message = str(info.value)
    assert "\n" not in message and f"no key {key}" in message and f"did you mean {existing}?" in message


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("ppo.kl.beta", "-1", "greater than or equal to 0"),
    ("ppo.kl.beta", "high", "valid number"),
    ("ppo.learning_rate", ".inf", "finite"),
    ("reward.champion_min_accuracy", "0.5", "greater than 0.5"),
    ("ppo.kl.controller", "pid", "'fixed' or 'adaptive'"),
    ("ppo.minibatches", "3", "divisible"),
    ("ppo.kl", "{beta: 1}", "is a section"),
    ("ppo.kl.beta.value", "1", "ppo.kl.beta is a value"),
    ("ppo.updates", "[unclosed", "not valid YAML"),
    ("ppo.updates", "&a [*a]", "recursive YAML alias"),
])
def test_override_values_are_validated_by_the_field_type(key, value, expected):
    with pytest.raises(ConfigError, match=None) as info:
        with_overrides(REPO_PARAMS, {key: value})
    assert "\n" not in str(info.value) and expected in str(info.value)


def test_a_version_that_looks_like_a_number_stays_text():
    assert with_overrides(REPO_PARAMS, {"candidates.policy": "3"}).candidates.policy == "3"


def test_set_params_edits_exactly_the_key_and_keeps_comments_and_layout(tmp_path):
    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    overrides = {"ppo.kl.beta": "0.3", "base_model.tiny.seed": "7", "candidates.policy": "3",
                 "labeling.demonstration_words": "[10, 50]", "evaluate.best_of_n": "[1, 4]"}
    changed = set_params(path, {**overrides, "ppo.updates": str(REPO_PARAMS.ppo.updates)})
    assert changed == list(overrides)
    before, after = original.splitlines(), path.read_text().splitlines()
    assert len(before) == len(after)
    edited = [(old, new) for old, new in zip(before, after) if old != new]
    assert [new.split("#")[0].strip() for _, new in edited] == [
        "seed: 7", "policy: '3'", "demonstration_words: [10, 50]", "beta: 0.3", "best_of_n: [1, 4]"
    ]
    for old, new in edited:  # the comment stays, in its column
        assert ("#" in old) == ("#" in new) and (old.find("#") == new.find("#") or "#" not in old)
    assert load_params(path) == with_overrides(REPO_PARAMS, overrides)
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # no temporary file left behind


def test_set_params_writes_nothing_when_any_override_is_bad(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    before = path.read_bytes()
    for overrides in ({"ppo.kl.beta": "0.3", "ppo.beta": "0.1"}, {"ppo.kl.beta": "0.3", "ppo.minibatches": "3"},
                      {"ppo.kl.beta": "0.3", "ppo.learning_rate": ".nan"}):
        with pytest.raises(ConfigError):
            set_params(path, overrides)
        assert path.read_bytes() == before
    assert set_params(path, {"ppo.kl.beta": str(REPO_PARAMS.ppo.kl.beta)}) == []
    assert path.read_bytes() == before


def test_set_params_adds_a_key_the_file_leaves_to_its_default(tmp_path):
    path = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    path.write_text(text.replace("    horizon: 64 ", "    # horizon left out "))
    set_params(path, {"ppo.kl.horizon": "128", "ppo.kl.estimator": "k3"})
    params = load_params(path)
    assert (params.ppo.kl.horizon, params.ppo.kl.estimator, params.ppo.kl.target) == (128, "k3", REPO_PARAMS.ppo.kl.target)


def test_set_params_refuses_an_edit_that_would_change_another_key(tmp_path):
    path = _text_with(tmp_path, "  seed: 0\n\nppo:", "  seed: &shared 0\n\nppo:")  # reward.seed
    path = _text_with(tmp_path, "  seed: 0\n\nevaluate:", "  seed: *shared\n\nevaluate:", base=path.read_text())
    assert load_params(path).ppo.seed == load_params(path).reward.seed == 0
    before = path.read_bytes()
    for key in ("ppo.seed", "reward.seed"):
        with pytest.raises(ConfigError, match="without changing other values"):
            set_params(path, {key: "1"})
        assert path.read_bytes() == before
