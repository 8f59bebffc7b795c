from pathlib import Path

import pytest

from dtm.cli import main
from dtm.config import ExperimentConfig, example_config, load_config, parse_override
from dtm.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def test_defaults_are_the_papers_recipe():
    cfg = ExperimentConfig()
    assert cfg.disperse.k == 4
    lora = cfg.train.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 16, 0.05)
    assert lora.target_modules == ["gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.learning_rate, t.lr_scheduler_type, t.warmup_steps) == (3e-4, "cosine", 100)
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps == 16
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.max_grad_norm, t.weight_decay) == (0.9, 0.98, 1e-6, 0.3, 0.0)
    assert cfg.data.cutoff_len == 1024 and cfg.data.template == "alpaca" and cfg.data.first_turn_only
    assert cfg.merge.method == "average"


def test_unknown_key_names_file_line_and_key(tmp_path):
    p = write(tmp_path, "seed: 1\ndisperse:\n  k: 2\n  stratgy: random\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, check_paths=False)
    msg = str(e.value)
    assert f"{p}:4: disperse.stratgy: unknown key" in msg


@pytest.mark.parametrize(
    "text, key",
    [
        ("disperse:\n  k: 0\n", "disperse.k"),
        ("train:\n  lora:\n    r: 0\n", "train.lora.r"),
        ("train:\n  learning_rate: fast\n", "train.learning_rate"),
        ("train:\n  save_fractions: [0.5, 1.5]\n", "train.save_fractions"),
    ],
)
def test_impossible_values_name_the_key(tmp_path, text, key):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{p}:\d+: {key}:"):
        load_config(p, check_paths=False)


def test_missing_data_file_is_reported_with_key(tmp_path):
    p = write(tmp_path, "data:\n  path: nowhere.jsonl\n")
    with pytest.raises(ConfigError, match=r"exp.yaml:2: data.path: file not found"):
        load_config(p)


def test_relative_paths_resolve_against_the_config_dir(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    p = write(tmp_path, "data:\n  path: d.jsonl\nmodel:\n  model_name_or_path: org/model\neval:\n  suites: [knowledge]\noutput_dir: out\n")
    cfg = load_config(p)
    assert cfg.data.path == str(tmp_path / "d.jsonl")
    assert cfg.output_dir == "out"  # relative to the working directory, like TrainingArguments


def test_overrides_are_yaml_values_on_dotted_keys(tmp_path):
    p = write(tmp_path, "disperse:\n  k: 2\n")
    cfg = load_config(p, ["disperse.k=8", "train.lora.target_modules=[q_proj, v_proj]", "merge.weights=[1, 2]"], check_paths=False)
    assert cfg.disperse.k == 8
    assert cfg.train.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.merge.weights == [1.0, 2.0]
    assert cfg.dispersal_seed == cfg.seed  # the experiment seed unless set
    assert parse_override("a.b=") == (["a", "b"], "")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("disperse.k")
    with pytest.raises(ConfigError, match="disperse.kk: unknown key"):
        load_config(None, ["disperse.kk=3"])


def test_a_config_that_cannot_run_is_refused_at_load_with_every_reason(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    p = write(tmp_path, "data:\n  path: d.jsonl\neval:\n  suites: [instruction]\nbaselines:\n  methods: [replay]\n")
    from dtm.pipeline import check_runnable

    cfg = load_config(p)  # valid values: `dtm config show` shows it
    with pytest.raises(ConfigError) as err:
        check_runnable(cfg)  # what `dtm run` does first
    lines = str(err.value).splitlines()[1:]
    assert [line.strip().split(": ")[1] for line in lines] == ["model.model_name_or_path", "baselines.methods", "eval.suites"]
    assert lines[1].strip().startswith(f"{p}:6: baselines.methods: replay needs baselines.replay_path")


def test_stage_hashes_change_from_the_changed_section_on():
    from dtm.pipeline import stage_hashes

    a, b = ExperimentConfig(), ExperimentConfig()
    b.merge.method = "ties"
    ha, hb = stage_hashes(a), stage_hashes(b)
    assert [ha[s] == hb[s] for s in ("data", "disperse", "train", "merge", "eval")] == [True, True, True, False, False]


def test_allowed_values_come_from_the_registries():
    from dtm.dispersal import STRATEGIES
    from dtm.merging.methods import method_names
    from dtm.plan import BASELINES

    for key, names in (("merge.method", method_names()), ("disperse.strategy", STRATEGIES), ("baselines.methods", list(BASELINES))):
        for name in names:
            load_config(None, [f"{key}={[name] if key == 'baselines.methods' else name}"], check_paths=False)
        with pytest.raises(ConfigError, match=f"{key}: .*unknown value 'nope'; choose one of {', '.join(names)}"):
            load_config(None, [f"{key}={['nope'] if key == 'baselines.methods' else 'nope'}"], check_paths=False)


def test_gradient_checkpointing_takes_three_values_and_names_the_key_on_any_other(tmp_path):
    for text, value in (("false", False), ("true", True), ("selective", "selective")):
        assert load_config(None, [f"train.gradient_checkpointing={text}"], check_paths=False).train.gradient_checkpointing == value
    p = write(tmp_path, "train:\n  gradient_checkpointing: mlp\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: train.gradient_checkpointing: Input should be False, True or 'selective' \(got 'mlp'\)"):
        load_config(p, check_paths=False)


def test_example_config_round_trips(tmp_path):
    p = write(tmp_path, example_config())
    cfg = load_config(p, check_paths=False)
    assert cfg.model_dump(exclude={"output_dir"}) == ExperimentConfig().model_dump(exclude={"output_dir"})


def test_cli_config_show_and_bad_yaml(tmp_path, capsys):
    assert main(["config", "show", "disperse.k=3"]) == 0
    assert "k: 3" in capsys.readouterr().out
    p = write(tmp_path, "disperse: [unclosed\n")
    assert main(["config", "show", str(p)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err
    assert main(["config", "init", "--out", str(tmp_path / "init.yaml")]) == 0
    assert load_config(tmp_path / "init.yaml", check_paths=False).disperse.k == 4


def test_duplicate_seeds_are_refused_with_file_and_line(tmp_path):
    p = write(tmp_path, "seed: 3\nseeds: [1, 2, 1]\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: seeds: .*1 appears twice"):
        load_config(p, check_paths=False)


def test_an_empty_config_file_is_refused(tmp_path, capsys):
    p = write(tmp_path, "# nothing here\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml: empty config; `dtm config init` writes one"):
        load_config(p, check_paths=False)
    assert main(["run", str(p)]) == 2
    assert "empty config" in capsys.readouterr().err


def test_a_duplicated_key_names_both_lines(tmp_path):
    p = write(tmp_path, "seed: 1\ntrain:\n  learning_rate: 0.1\n  max_steps: 3\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError, match=rf"{p}:5: key 'learning_rate' appears twice \(first at line 3\)"):
        load_config(p, check_paths=False)
    p = write(tmp_path, "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: key 'seed' appears twice \(first at line 1\)"):
        load_config(p, check_paths=False)
