"""Every training key at its default: the config other configs start from.

The keys, their defaults, one-line comments and checks live in one place,
tttjax/config/schema.py (the names are moshi-finetune's and the TTT-Moshi guide's);
`python -m tttjax.main --help` lists them, and `--help --config=X` lists X's values. Other configs
call `get_config()` here and change what they need; `--config.a.b=v` overrides any key on the
command line, and unknown keys fail.
"""

import ml_collections

from tttjax.config.schema import default_config


def get_config() -> ml_collections.ConfigDict:
    return default_config()
