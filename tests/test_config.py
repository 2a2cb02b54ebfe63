"""The config loader: every failure is one line that names the file and the key."""

from __future__ import annotations

import pytest
from pydantic import Field, ValidationError

from tooltune.config import ConfigError, StrictModel, apply_overrides, dump_config, load_config, save_config


class Trainer(StrictModel):
    lr: float = 1e-3
    epochs: int = Field(1, ge=1)
    layers: list[int] = [1, 2]


class Lora(StrictModel):
    r: int = 8


class Job(StrictModel):
    name: str = "sft"
    trainer: Trainer = Trainer()
    lora: Lora | None = None


def write(tmp_path, text, name="sft.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, Job, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "name: run1\ntrainer:\n  lr: 1e-4\n  epochs: 3\n")
    cfg = load_config(p, Job, ["trainer.layers=[4, 5]", "trainer.epochs=7", "lora.r=16"])
    assert cfg.name == "run1"
    assert cfg.trainer.lr == 1e-4  # YAML 1.1 alone would read "1e-4" as a string
    assert cfg.trainer.epochs == 7 and cfg.trainer.layers == [4, 5]
    assert cfg.lora == Lora(r=16)


def test_empty_file_is_all_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), Job) == Job()


def test_missing_file(tmp_path):
    msg = error_of(tmp_path / "nope.yaml")
    assert msg == f"{tmp_path / 'nope.yaml'}: no such config file"


def test_malformed_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "name: a\ntrainer:\n  lr: [1,\n  epochs: 2\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:") and "malformed YAML" in msg
    line = int(msg[len(str(p)) + 1 :].split(":")[0])
    assert 3 <= line <= 5


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path, "name: a\nname: b\n")
    assert error_of(p) == f"{p}:2: malformed YAML: duplicate key 'name'"


def test_top_level_must_be_a_mapping(tmp_path):
    msg = error_of(write(tmp_path, "- 1\n- 2\n"))
    assert "top level must be a mapping" in msg and "list" in msg


def test_unknown_key_is_named_with_its_path(tmp_path):
    p = write(tmp_path, "trainer:\n  lrr: 0.1\n")
    assert error_of(p) == f"{p}: unknown key 'trainer.lrr'"


def test_unknown_key_inside_an_optional_section(tmp_path):
    p = write(tmp_path, "lora:\n  rr: 4\n")
    assert error_of(p) == f"{p}: unknown key 'lora.rr'"


def test_wrong_type_names_key_and_value(tmp_path):
    p = write(tmp_path, "trainer:\n  lr: abc\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}: trainer.lr: Input should be a valid number")
    assert msg.endswith("got 'abc'")


def test_constraint_violation(tmp_path):
    msg = error_of(write(tmp_path, "trainer:\n  epochs: 0\n"))
    assert "trainer.epochs: Input should be greater than or equal to 1, got 0" in msg


def test_override_errors_say_which_override(tmp_path):
    p = write(tmp_path, "")
    assert error_of(p, ["trainer.lrr=1"]) == f"{p}: unknown key 'trainer.lrr' (from override 'trainer.lrr=1')"
    assert "(from override 'trainer.lr=abc')" in error_of(p, ["trainer.lr=abc"])


@pytest.mark.parametrize("bad", ["trainer.lr", "=3", "trainer..lr=3", "trainer.lr=[1,"])
def test_malformed_override(tmp_path, bad):
    msg = error_of(write(tmp_path, ""), [bad])
    assert "malformed override" in msg and repr(bad) in msg


def test_override_through_a_scalar(tmp_path):
    msg = error_of(write(tmp_path, "name: x\n"), ["name.first=1"])
    assert "'name' is not a mapping" in msg


def test_several_errors_stay_on_one_line(tmp_path):
    msg = error_of(write(tmp_path, "a: 1\nb: 2\nc: 3\nd: 4\ntrainer:\n  lr: x\n"))
    assert "unknown key 'a'" in msg and "(and 2 more)" in msg


def test_assignment_is_validated():
    cfg = Job()
    with pytest.raises(ValidationError):
        cfg.trainer.epochs = 0


def test_dump_and_save_round_trip(tmp_path):
    cfg = Job(name="ü", trainer=Trainer(lr=3e-5, layers=[3]), lora=Lora(r=2))
    assert dump_config(cfg) == {"name": "ü", "trainer": {"lr": 3e-5, "epochs": 1, "layers": [3]}, "lora": {"r": 2}}
    assert load_config(save_config(cfg, tmp_path / "run" / "config.yaml"), Job) == cfg


def test_apply_overrides_to_an_instance():
    cfg = apply_overrides(Job(), ["trainer.epochs=2"], source="cli")
    assert cfg.trainer.epochs == 2 and Job().trainer.epochs == 1
    with pytest.raises(ConfigError, match=r"^cli: unknown key 'nme'"):
        apply_overrides(Job(), ["nme=x"], source="cli")


def test_config_changes_names_dotted_keys_and_skips_ignored_and_added_ones():
    from tooltune.config import config_changes

    old = {"lr": 0.1, "train": {"steps": 10, "keep": 2}, "eval": {"limit": 5}}
    new = {"lr": 0.2, "train": {"steps": 10, "keep": 3, "seed": 0}, "eval": {"limit": 9}}
    assert config_changes(old, new) == ["lr (0.1 -> 0.2)", "train.keep (2 -> 3)", "eval.limit (5 -> 9)", "train.seed (<unset> -> 0)"]
    assert config_changes(old, new, ignore=["eval", "train.keep"]) == ["lr (0.1 -> 0.2)", "train.seed (<unset> -> 0)"]
    assert config_changes(old, new, ignore=["eval", "train.keep"], added_ok=True) == ["lr (0.1 -> 0.2)"]


def test_a_base_file_is_read_first_and_laid_under(tmp_path):
    write(tmp_path, "name: base\ntrainer:\n  lr: 0.5\n  epochs: 3\n  layers: [1, 2, 3]\n", "base.yaml")
    sub = tmp_path / "sub"
    sub.mkdir()
    p = write(sub, "base: ../base.yaml\ntrainer:\n  epochs: 4\n  layers: [9]\n", "over.yaml")
    cfg = load_config(p, Job, ["trainer.lr=0.25"])
    # Mappings merge key by key; a list replaces the base's; overrides still come last.
    assert cfg.name == "base" and cfg.trainer == Trainer(lr=0.25, epochs=4, layers=[9])


def test_a_base_that_includes_itself_or_is_missing_is_one_line(tmp_path):
    a = write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    assert "includes itself" in error_of(a)
    assert "no such config file" in error_of(write(tmp_path, "base: gone.yaml\n", "c.yaml"))
    assert "base must be the path" in error_of(write(tmp_path, "base: [1]\n", "d.yaml"))
