"""The run config: every key with its default, comment and check (`schema`), and the one reader of
Python configs, YAML (moshi-finetune TrainArgs, a run's args.yaml) and overrides (`reader`)."""
