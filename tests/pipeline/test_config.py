import pytest

from pipeline.config import Config, ConfigError, TrainConfig, load_config, resolve_batch, save_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "model:\n  name: dinat_mini\ndata:\n  train: shards/\noptim:\n  base_lr: 2.0e-3\n")
    cfg = load_config(
        p,
        [
            "optim.base_lr=5e-4",
            "train.steps=100",
            "model.activation_checkpointing=2",
            "data.auto_augment=null",
            "optim.betas=[0.9, 0.95]",
            "deepspeed.zero_optimization.stage=3",
        ],
    )
    assert cfg.model.name == "dinat_mini"
    assert cfg.optim.base_lr == 5e-4 and isinstance(cfg.optim.base_lr, float)
    assert cfg.train.steps == 100 and cfg.model.activation_checkpointing == 2
    assert cfg.data.auto_augment is None and cfg.optim.betas == (0.9, 0.95)
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.train=x", "model.name=dinat_debug", "train.micro_batch_size=4"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


BAD = [
    (["modle.name=dinat_mini"], "modle.name: unknown key"),
    (["model.nmae=dinat_mini"], "model.nmae: unknown key"),
    (["model.name=dinat_huge"], "model.name: unknown variant 'dinat_huge'"),
    (["model.attention_backend=flash"], "model.attention_backend: must be one of"),
    (["model.activation_checkpointing=some"], "model.activation_checkpointing: 'none', 'all' or a positive int"),
    (["model.activation_checkpointing=0"], "model.activation_checkpointing"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate: 1.5 is outside"),
    (["model.overrides={kernel_size: 4}"], "model.overrides: kernel_size must be an odd number"),
    (["model.overrides={embed_dims: 4}"], "model.overrides: unknown DinatConfig field"),
    (["data.train="], "data.train: required"),
    (["data.mode=shuffled"], "data.mode: 'resampled' or 'epoch'"),
    (["data.workers=-1"], "data.workers: must be >= 0"),
    (["data.workers=two"], "data.workers: expected an integer, got 'two'"),
    (["data.image_size=100"], "data.image_size: a multiple of 32"),
    (["data.re_prob=2"], "data.re_prob: 2.0 is outside"),
    (["optim.base_lr=fast"], "optim.base_lr: expected a number, got 'fast'"),
    (["optim.lr=-1"], "optim.lr: -1.0 is outside"),
    (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas: each in"),
    (["train.precision=fp8"], "train.precision: auto | bf16 | fp16 | fp32"),
    (["train.global_batch_size=0"], "train.global_batch_size: must be >= 1"),
    (["train.steps=0"], "train.steps: must be >= 1"),
    (["train.steps=null", "train.epochs=null"], "train.steps or train.epochs"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints: must be >= 1"),
    (["run.output_dir="], "run.output_dir: required"),
    (["run.export=maybe"], "run.export: expected true/false"),
    (["run.export=false", "run.push_to=me/dinat"], "run.push_to: needs run.export=true"),
    (["deepspeed.zero_optimization.stage=4"], "deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3"),
    (["deepspeed.train_batch_size=64"], "deepspeed.train_batch_size: derived by the pipeline; set train.global"),
    (["deepspeed.bf16={enabled: true}"], "deepspeed.bf16: set by the pipeline"),
    (["train=5"], "train: expected a mapping"),
    (["optim.lr"], "override 'optim.lr': expected key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[b[1][:40] for b in BAD])
def test_malformed_configs_are_refused_with_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, ["data.train=shards"] + overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config(tmp_path / "nowhere.yaml")
    with pytest.raises(ConfigError, match="c.yaml: not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="c.yaml: expected a mapping at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "kw,world,expected",
    [
        ({}, 8, (512, 1, 4096)),
        ({"micro_batch_size": 64}, 8, (64, 8, 4096)),
        ({"grad_accum": 4}, 2, (512, 4, 4096)),
        ({"micro_batch_size": 32, "grad_accum": 2}, 64, (32, 2, 4096)),
    ],
)
def test_batch_resolution(kw, world, expected):
    assert resolve_batch(TrainConfig(**kw), world) == expected


def test_batch_contradictions():
    with pytest.raises(ConfigError, match=r"4096 != micro_batch_size 32 x grad_accum 2 x world size 8 = 512"):
        resolve_batch(TrainConfig(micro_batch_size=32, grad_accum=2), 8)
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size 48 x world size 8"):
        resolve_batch(TrainConfig(micro_batch_size=48), 8)
    with pytest.raises(ConfigError, match="not divisible by grad_accum 1 x world size 3"):
        resolve_batch(TrainConfig(global_batch_size=64), 3)


def test_defaults_are_the_field_recipe():
    cfg = Config()
    assert (cfg.optim.base_lr, cfg.optim.base_batch_size, cfg.optim.weight_decay) == (1e-3, 4096, 0.05)
    assert (cfg.train.epochs, cfg.optim.warmup_epochs, cfg.data.mixup, cfg.data.cutmix) == (90, 5, 0.8, 1.0)
    assert (cfg.data.label_smoothing, cfg.data.re_prob, cfg.data.auto_augment) == (0.1, 0.25, "rand-m9-mstd0.5-inc1")
