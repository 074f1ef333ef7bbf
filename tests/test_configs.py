"""Config files: every key documented, every config builds its model, every parameter has a sharding rule."""

import importlib

import jax
import numpy as np
import pytest
from flax import nnx

from tttjax.config import schema
from tttjax.model.config import from_run_config as model_config
from tttjax.model.moshi import abstract_model
from tttjax.parallel.sharding import LOGICAL_RULES, logical_to_spec

CONFIGS = ["base", "tiny", "moshi_7b_ttt", "moshi_7b_ttt_v5p8", "moshi_7b_ttt_v5e16", "moshi_7b_ttt_long"]
# per-pod configs -> the TPU slice they are proven on (docs/distributed.md, section 7)
POD_CONFIGS = {"moshi_7b_ttt_v5p8": "v5p-8", "moshi_7b_ttt_v5e16": "v5e-16"}


def test_every_key_has_a_comment_and_every_config_validates():
    keys = schema.key_paths()
    assert len(keys) > 40
    assert not [k for k, e in schema.entries() if not e.comment.strip()]
    for name in CONFIGS:
        config = importlib.import_module(f"configs.{name}").get_config()
        schema.validate(config, source=f"configs/{name}.py: ")  # raises on a bad value


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_model_with_sharding_rules(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = abstract_model(model_config(config))
    rules = dict(LOGICAL_RULES)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.ndim, (path, names, variable.shape)
        assert all(n is None or n in rules for n in names), (path, names)
        logical_to_spec(names)


def test_7b_ttt_config_sizes():
    config = importlib.import_module("configs.moshi_7b_ttt").get_config()
    cfg = model_config(config)
    assert cfg.ttt_layers == (1, 5, 10) and cfg.lora_rank == 128 and cfg.param_dtype == "bfloat16"
    params = nnx.state(abstract_model(cfg), nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    # base 7,687,729,152 + LoRA rank 128 (387.9 M, moshi-reference.md) + 3 TTT layers:
    # per layer 4 D^2 + 4 D (wq..wo) + H*(d*4d*2 + 4d + d) + H*D + H + 2*H*d + 2 D + D.
    D, H, d = 4096, 32, 128
    ttt = 4 * D * D + 4 * D + H * (2 * d * 4 * d + 4 * d + d) + H * D + H + 2 * H * d + 3 * D
    lora = total - 7_687_729_152 - 3 * ttt
    assert abs(lora - 387.9e6) < 0.1e6, lora


@pytest.mark.parametrize("name,topology", sorted(POD_CONFIGS.items()))
def test_pod_config_mesh_spans_its_slice(name, topology):
    """A per-pod config names its mesh exactly: every device of its slice, the batch split evenly."""
    from tttjax.analysis.topology import topology as parse_topology
    from tttjax.parallel.mesh import resolve_mesh

    config = importlib.import_module(f"configs.{name}").get_config()
    topo = parse_topology(topology)
    ici, dcn = resolve_mesh(config.mesh.to_dict(), topo.chips)
    assert -1 not in ici and np.prod(ici) * np.prod(dcn) == topo.chips
    assert config.batch_size % (ici[0] * ici[1]) == 0
