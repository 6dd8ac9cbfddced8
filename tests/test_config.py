from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from grpo.config import ConfigError, config_to_yaml, format_help, parse_config, save_config


@dataclass
class ExampleConfig:
    """Example run config covering every supported field type."""
    lr: float = field(default=1e-6, metadata={"help": "peak learning rate"})
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    use_kl: bool = field(default=True, metadata={"help": "add the KL penalty"})
    model: str = "smollm2-135m-instruct"
    out_dir: Path = Path("runs/x")
    eval_every: int | None = None
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    types: list[str] = field(default_factory=lambda: ["PER", "ORG"])
    seeds: list[int] = field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.999)
    reward_weights: dict[str, float] = field(default_factory=lambda: {"f1": 10.0})

    def validate(self) -> None:
        if self.eval_every is not None and self.eval_every > self.steps:
            raise ConfigError(f"eval_every ({self.eval_every}) > steps ({self.steps}): lower eval_every or "
                              "raise steps")


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_without_arguments():
    assert parse_config(ExampleConfig, []) == ExampleConfig()


def test_yaml_then_cli_precedence(tmp_path):
    first = write(tmp_path, "lr: 1.0e-5\nsteps: 7\nmodel: a\n", "a.yaml")
    second = write(tmp_path, "steps: 8\n", "b.yaml")
    cfg = parse_config(ExampleConfig, ["--config", first, "--config", second, "--model", "b", "--model=c"])
    # lr from a.yaml, steps from the later b.yaml, model from the last CLI option; the rest are defaults.
    assert (cfg.lr, cfg.steps, cfg.model, cfg.use_kl) == (1e-5, 8, "c", True)
    # CLI beats YAML even when the CLI option comes before --config.
    assert parse_config(ExampleConfig, ["--steps", "3", "--config", first]).steps == 3


@pytest.mark.parametrize("text,expected", [("true", True), ("false", False), ("1", True), ("0", False),
                                           ("yes", True), ("no", False), ("TRUE", True)])
def test_bool_words(text, expected):
    assert parse_config(ExampleConfig, ["--use_kl", text]).use_kl is expected


def test_bare_bool_flag_means_true():
    cfg = parse_config(ExampleConfig, ["--use-kl=false", "--use-kl", "--steps", "2"])
    assert cfg.use_kl is True and cfg.steps == 2


def test_cli_coercions():
    cfg = parse_config(ExampleConfig, [
        "--lr", "5e-6", "--steps", "1e3", "--out-dir", "runs/y", "--eval_every", "20", "--schedule", "linear",
        "--types", "LOC, MISC", "--seeds=1,2,3", "--betas", "0.8,0.95", "--reward_weights", "f1=1.0,schema=2"])
    assert cfg.lr == 5e-6 and isinstance(cfg.lr, float)
    assert cfg.steps == 1000 and isinstance(cfg.steps, int)
    assert cfg.out_dir == Path("runs/y")
    assert cfg.eval_every == 20 and cfg.schedule == "linear"
    assert cfg.types == ["LOC", "MISC"] and cfg.seeds == [1, 2, 3]
    assert cfg.betas == (0.8, 0.95)
    assert cfg.reward_weights == {"f1": 1.0, "schema": 2.0}


@pytest.mark.parametrize("word", ["none", "null", "None"])
def test_optional_none_words(word):
    assert parse_config(ExampleConfig, ["--eval_every", "5", f"--eval_every={word}"]).eval_every is None


def test_yaml_coercions(tmp_path):
    # PyYAML reads 5e-6 (no dot) as the STRING "5e-6"; the float field must still get 5e-6.
    path = write(tmp_path, "lr: 5e-6\nuse_kl: no\neval_every: null\ntypes: [A, B]\nseeds: 4,5\n"
                           "betas: [0.5, 0.6]\nreward_weights: {f1: 3, schema: 0.5}\nout_dir: /tmp/z\n")
    cfg = parse_config(ExampleConfig, ["--config", path])
    assert cfg.lr == 5e-6 and cfg.use_kl is False and cfg.eval_every is None
    assert cfg.types == ["A", "B"] and cfg.seeds == [4, 5] and cfg.betas == (0.5, 0.6)
    assert cfg.reward_weights == {"f1": 3.0, "schema": 0.5} and isinstance(cfg.reward_weights["f1"], float)
    assert cfg.out_dir == Path("/tmp/z")


def test_unknown_yaml_field_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "lr: 1.0e-5\n# comment\nsteps: 3\nstpes: 4\n")
    with pytest.raises(ConfigError) as err:
        parse_config(ExampleConfig, ["--config", path])
    message = str(err.value)
    assert f"{path}:4" in message  # 'stpes' is on line 4 (line 2 is a comment)
    assert "unknown config field 'stpes'" in message
    assert "'steps'" in message.split("did you mean", 1)[1]  # difflib ranks it among the closest names


def test_unknown_cli_field_suggests_closest():
    with pytest.raises(ConfigError, match=r"--use_kll.*did you mean 'use_kl'"):
        parse_config(ExampleConfig, ["--use_kll", "true"])


def test_yaml_not_a_mapping(tmp_path):
    path = write(tmp_path, "- lr\n- steps\n")
    with pytest.raises(ConfigError, match=rf"{path}:1: the config file must be a mapping.*list"):
        parse_config(ExampleConfig, ["--config", path])


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        parse_config(ExampleConfig, ["--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize("argv,pattern", [
    (["--steps", "abc"], r"--steps: expected an int, got 'abc'"),
    (["--lr", "fast"], r"--lr: expected a float"),
    (["--use_kl", "maybe"], r"--use_kl: expected a bool"),
    (["--schedule", "step"], r"--schedule: expected one of 'cosine', 'linear', 'constant'"),
    (["--betas", "0.9"], r"--betas: expected 2 comma-separated values"),
    (["--reward_weights", "f1"], r"--reward_weights: expected a mapping"),
    (["--seeds", "1,x"], r"--seeds\[1\]: expected an int"),
    (["--steps"], r"--steps: missing value"),
    (["steps", "3"], r"unexpected argument 'steps'"),
])
def test_bad_cli_values(argv, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config(ExampleConfig, argv)


def test_bad_yaml_value_names_line(tmp_path):
    path = write(tmp_path, "steps: 3\nmodel: yes\n")  # YAML 1.1 reads `yes` as a bool
    with pytest.raises(ConfigError, match=rf"{path}:2: field 'model': expected a string"):
        parse_config(ExampleConfig, ["--config", path])


def test_validate_runs_after_build():
    with pytest.raises(ConfigError, match="eval_every"):
        parse_config(ExampleConfig, ["--steps", "10", "--eval_every", "11"])


def test_required_field_missing():
    @dataclass
    class Needs:
        data: str
        n: int = 1

    with pytest.raises(ConfigError, match="missing required config field.*data"):
        parse_config(Needs, [])
    assert parse_config(Needs, ["--data", "x"]).data == "x"


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(ExampleConfig, ["--steps", "3", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(ExampleConfig):
        assert f"--{f.name} " in out
    assert "--lr float  (default: 1e-06)" in out and "peak learning rate" in out
    assert "--eval_every int | None  (default: None)" in out
    assert out == format_help(ExampleConfig)


def test_yaml_round_trip(tmp_path):
    cfg = parse_config(ExampleConfig, ["--lr", "5e-6", "--eval_every", "9", "--betas", "0.8,0.9",
                                       "--out_dir", "a/b", "--reward_weights", "x=0.25"])
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert parse_config(ExampleConfig, ["--config", str(path)]) == cfg
    assert "lr: 5.0e-06" in config_to_yaml(cfg)  # with the dot, so YAML itself reads it back as a float
