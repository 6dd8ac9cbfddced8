"""User errors: one line on stderr, exit status 2, no traceback (``--debug`` shows it), found before any model
loads; TRL/transformers flag names get this project's name; reward presets by name and a default reward."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.cli import run_cli
from grpo.config import ConfigError, check_paths, format_help, parse_config
from grpo.errors import UserError
from grpo.models import check_model_spec

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def script(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=180)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# ----------------------------------------------------------------------------- the real scripts

def test_bad_reward_is_reported_before_the_model_loads_and_debug_shows_the_traceback():
    # The model is a hub id that cannot load offline: had it loaded first, the error would be about the hub.
    args = ["--model", "no-such-org/no-such-model", "--reward_weights", "f1=1,nosuch=2"]
    line = one_error_line(script("train_grpo.py", *args))
    assert "unknown reward(s) nosuch" in line and "blog_entity" in line and "hub" not in line
    debug = script("train_grpo.py", *args, "--debug")
    assert debug.returncode not in (0, 2) and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_missing_data_file_is_reported_before_the_model_loads(tmp_path):
    line = one_error_line(script("train_grpo.py", "--model", "no-such-org/no-such-model", "--dataset",
                                 str(tmp_path / "train.jsonl")))
    assert f"dataset='{tmp_path / 'train.jsonl'}': neither a registered data set" in line and "hub" not in line


def test_grpo_preset_before_its_sft_stage_names_the_missing_folder_and_the_command(tmp_path):
    # From an empty folder the preset's model, runs/sft_smollm2_conll, does not exist (transformers used to say
    # "couldn't connect to huggingface.co").
    line = one_error_line(script("train_grpo.py", "--config", str(ROOT / "configs/grpo_smollm2_conll.yaml"),
                                 cwd=tmp_path))
    assert "model folder runs/sft_smollm2_conll does not exist" in line
    assert "python train_sft.py --config configs/sft_smollm2_conll.yaml" in line


def test_trl_flag_gets_this_projects_name_and_evaluate_bad_dataset_is_one_line(tmp_path):
    line = one_error_line(script("train_sft.py", "--learning_rate", "1e-4"))
    assert "did you mean --lr (TRL/transformers' learning_rate)?" in line
    line = one_error_line(script("evaluate.py", "--dataset", "conll2003,no_such_set", "--model", "./missing"))
    assert "no_such_set" in line and "model folder ./missing does not exist" in line


# ----------------------------------------------------------------------------- run_cli itself

def _raiser(exc: BaseException):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc, expected", [
    (UserError("bad thing"), "error: bad thing"),
    (ConfigError("a\n  b"), "error: a b"),  # a multi-line message still prints as one line
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "data.txt"),
     "error: No such file or directory: data.txt"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/metrics.jsonl"), "error: disk full while writing "
                                                                          "/x/metrics.jsonl"),
])
def test_user_errors_print_one_line_and_exit_2(exc, expected, capsys, monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        run_cli(_raiser(exc), [])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1


def test_bugs_keep_their_traceback_and_debug_reraises_user_errors(monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    with pytest.raises(KeyError):
        run_cli(_raiser(KeyError("x")), [])
    with pytest.raises(UserError):
        run_cli(_raiser(UserError("x")), ["--debug"])
    monkeypatch.setenv("GRPO_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli(_raiser(UserError("x")), [])


def test_debug_flag_is_taken_out_of_argv_and_the_result_returned():
    assert run_cli(lambda argv: argv, ["--a", "1", "--debug"]) == ["--a", "1"]


def test_only_rank_0_prints_a_config_error_but_every_rank_exits(capsys, monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        run_cli(_raiser(ConfigError("same on every rank")), [])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):  # other user errors may be this rank's own: printed, with the rank
        run_cli(_raiser(UserError("local disk")), [])
    assert capsys.readouterr().err == "[rank 1] error: local disk\n"


# ----------------------------------------------------------------------------- flags, presets, model specs

@pytest.mark.parametrize("flag, config, suggestion", [
    ("learning_rate", "grpo", "--lr"), ("num_generations", "grpo", "--group_size"),
    ("save_total_limit", "grpo", "--keep_last"), ("per_device_train_batch_size", "grpo", "--micro_batch_size"),
    ("per_device_train_batch_size", "sft", "--batch_size"), ("num_train_epochs", "sft", "--epochs"),
    ("max_steps", "grpo", "--total_steps"), ("output_dir", "sft", "--out_dir"),
    ("max_completion_length", "grpo", "--max_completion_len"),
])
def test_trl_names_suggest_this_projects_field(flag, config, suggestion):
    from grpo.grpo_config import GRPOConfig
    from grpo.sft import SFTConfig

    cls = {"grpo": GRPOConfig, "sft": SFTConfig}[config]
    with pytest.raises(ConfigError, match=f"did you mean {suggestion} "):
        parse_config(cls, [f"--{flag}", "1"])


def test_report_to_says_what_is_logged_and_yaml_keys_get_suggestions_too(tmp_path):
    from grpo.grpo_config import GRPOConfig

    with pytest.raises(ConfigError, match=r"TensorBoard events \(<out_dir>/tb\) and <out_dir>/metrics.jsonl"):
        parse_config(GRPOConfig, ["--report_to", "wandb"])
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nlearning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: unknown config field 'learning_rate'; did you mean 'lr'"):
        parse_config(GRPOConfig, ["--config", str(path)])


def test_plain_run_has_a_reward_and_presets_are_chosen_by_name(tmp_path):
    from ner.rewards import PRESETS, REWARDS
    from train_grpo import NERGRPOConfig

    assert parse_config(NERGRPOConfig, []).reward_weights == {"f1": 10.0, "schema": 1.0}
    assert parse_config(NERGRPOConfig, ["--reward_weights", "blog"]).reward_weights == PRESETS["blog"]
    path = tmp_path / "c.yaml"
    path.write_text("reward_weights: reasoningner\n")
    assert parse_config(NERGRPOConfig, ["--config", str(path)]).reward_weights == PRESETS["reasoningner"]
    assert parse_config(NERGRPOConfig, ["--reward_weights", "f1=2,format=0.5"]).reward_weights == \
        {"f1": 2.0, "format": 0.5}
    with pytest.raises(ConfigError, match="unknown preset 'blgo'; expected one of blog, reasoningner"):
        parse_config(NERGRPOConfig, ["--reward_weights", "blgo"])
    help_text = format_help(NERGRPOConfig)
    assert "name=weight" in help_text and "--debug" in help_text
    assert all(name in help_text for name in [*REWARDS, *PRESETS])
    assert "blog = format=0.5,blog_entity=1,exact_match=2" in help_text


def test_every_shipped_config_parses():
    import yaml

    from train_grpo import NERGRPOConfig
    from train_sft import NERSFTConfig

    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cls = NERSFTConfig if path.name.startswith("sft") else NERGRPOConfig
        cfg = parse_config(cls, ["--config", str(path)])
        assert cfg.model == yaml.safe_load(path.read_text())["model"]


def test_model_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_model_spec("smollm2-135m-instruct")
    check_model_spec("Qwen/Qwen2.5-1.5B-Instruct")  # hub-shaped: only the download can tell
    check_model_spec("gpt2")
    for spec in ("./x", "/nonexistent/model", "runs/sft_x", "a/b/c", "~/models/x"):
        with pytest.raises(UserError, match=f"model folder {spec} does not exist"):
            check_model_spec(spec)
    (tmp_path / "local").mkdir()  # an existing first folder makes local/x a path, not a hub id
    with pytest.raises(UserError, match="model folder local/x does not exist"):
        check_model_spec("local/x")
    with pytest.raises(UserError, match="neither config.json nor a complete checkpoint"):
        check_model_spec("local")
    (tmp_path / "f.bin").write_text("")
    with pytest.raises(UserError, match="is a file, not a model folder"):
        check_model_spec("f.bin", "ref_model")


def test_path_problems_are_all_reported_at_once(tmp_path):
    from train_grpo import NERGRPOConfig

    cfg = parse_config(NERGRPOConfig, ["--model", str(tmp_path / "m"), "--dataset", "nope", "--eval_limit", "5",
                                       "--eval_dataset", "crossner_ai", "--data_dir", str(tmp_path),
                                       "--prompt_filter", "gone.jsonl", "--resume", str(tmp_path / "ck")])
    with pytest.raises(ConfigError) as info:
        check_paths(cfg)
    message = str(info.value)
    for part in (f"model folder {tmp_path / 'm'} does not exist", "dataset='nope'",
                 f"{tmp_path}/crossner/ai/dev.txt not found", "prompt_filter=gone.jsonl", "resume="):
        assert part in message


def test_bad_values_fail_at_parse(tmp_path):
    from evaluate import EvalConfig
    from train_grpo import NERGRPOConfig
    from train_sft import NERSFTConfig

    with pytest.raises(ConfigError) as info:
        parse_config(NERGRPOConfig, ["--dtype", "fp8", "--format", "xml", "--log_every", "0", "--k_shot", "-1"])
    for part in ("dtype='fp8'", "format='xml'", "log_every=0", "k_shot=-1"):
        assert part in str(info.value)
    with pytest.raises(ConfigError, match="dtype='int4'"):
        parse_config(NERSFTConfig, ["--data", "x", "--dtype", "int4"])
    with pytest.raises(ConfigError, match="match='fuzzy'.*batch_size=0"):
        parse_config(EvalConfig, ["--match", "fuzzy", "--batch_size", "0"])


def test_a_hub_id_that_cannot_be_fetched_is_one_line_not_a_traceback():
    # Offline (as CI and the GPU machines are): transformers raises a bare OSError with a wall of text.
    proc = script("predict.py", "--model", "no-such-org/no-such-model", "Some text .")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: model=no-such-org/no-such-model: not a local folder, and loading it from the Hugging Face hub failed")
