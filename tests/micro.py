"""The micro model the training tests share: configs/tiny.py shrunk so that a Trainer compiles and
steps in seconds on 2 cores. One definition, for in-process configs (test_train.micro_config) and
for command-line overrides (the subprocess and TPU-compile tests)."""

MODEL = {"model.dim": 32, "model.num_layers": 3, "model.num_heads": 2, "model.card": 16, "model.text_card": 24,
         "model.depformer_dim": 16, "model.depformer_num_layers": 1, "model.depformer_num_heads": 2,
         "model.depformer_dim_feedforward": 64, "lora.rank": 2, "ttt.layers": "1", "ttt.mini_batch_size": 4}


def cli(**values) -> list[str]:
    """`--config=configs/tiny.py` and `--config.KEY=VALUE` overrides: the micro model, then `values`
    (keys with "__" for ".", e.g. data__train_data="synthetic:64")."""
    settings = {**MODEL, **{key.replace("__", "."): value for key, value in values.items()}}
    return ["--config=configs/tiny.py"] + [f"--config.{key}={value}" for key, value in settings.items()]
