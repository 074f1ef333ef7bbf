"""`tttjax.compile --search` (tttjax/layout_search.py): which layouts are candidates, how they are
ranked, the extrapolation from fewer layers, and one real search for a TPU topology (micro model)."""

import importlib.util
import json

import pytest

import micro
from tttjax import compile as compile_cli
from tttjax import layout_search as ls
from tttjax.config import reader
from tttjax.analysis import topology
from tttjax.model.config import REMAT_MODES

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (.ci/run installs it)")
SMALL = micro.cli(batch_size=8, duration_sec=1.28)


def _config(*args):
    return reader.load("configs/tiny.py", reader.split_config_args(SMALL + list(args))[1])


def test_candidates_split_the_batch_and_fit_the_estimate():
    config = _config()
    found = ls.candidates(config, 8, 1, hbm_bytes=2 ** 40)
    layouts = [layout for layout, _ in found]
    assert layouts and all(l.data * l.fsdp * l.tensor == 8 for l in layouts)
    assert all((8 // l.num_microbatches) % (l.data * l.fsdp) == 0 for l in layouts)
    assert {l.remat for l in layouts} == set(REMAT_MODES)
    # with plenty of memory nothing is microbatched, and fsdp=1 has only the one placement
    assert {l.num_microbatches for l in layouts} == {1}
    assert all(l.frozen_weights == "sharded" for l in layouts if l.fsdp == 1)
    assert {l.frozen_weights for l in layouts if l.fsdp > 1} == {"sharded", "gather_once", "replicated"}
    # full fine-tuning has no frozen weights to place
    assert {l.frozen_weights for l, _ in ls.candidates(_config("--config.full_finetuning=true"), 8, 1, 2 ** 40)} \
        == {"sharded"}
    # tight memory: what does not fit whole is microbatched, what cannot fit at all is dropped
    tight = min(e for _, e in found) * 1.0
    small = ls.candidates(config, 8, 1, hbm_bytes=int(tight / ls.ESTIMATE_EXCESS) + 1)
    assert small and all(e <= ls.ESTIMATE_EXCESS * (int(tight / ls.ESTIMATE_EXCESS) + 1) for _, e in small)
    assert len(small) < len(found)


def _report(step_s, total_bytes, hbm=100, layers=0, times=None):
    compute, memory, collectives = times or (step_s, step_s / 2, step_s / 3)
    return {"fits": total_bytes <= hbm, "hbm_bytes": hbm, "num_devices": 2, "batch_size": 2, "num_frames": 10,
            "model_flops_per_step": 1e3 * (4 + layers), "per_device": {"total_bytes": total_bytes},
            "performance": {"peak_flops": 1e3,
                            "step_s": {"overlap": max(compute, memory, collectives),
                                       "roofline": max(compute + memory, collectives),
                                       "serial": compute + memory + collectives},
                            "time_s": {"compute": compute, "memory": memory, "collectives": collectives},
                            "parts": {"layers": {"time_s": compute, "share": 0.5, "mxu_efficiency": 0.9},
                                      "rest": {"time_s": memory, "share": 0.5, "mxu_efficiency": None}},
                            "mxu": {"efficiency": 0.9}},
            "weight_gathers": {"compiled_bytes": 12 + layers, "minimum_bytes": 10 + layers}}


def test_search_ranks_by_predicted_step_time_and_names_the_best_overrides():
    config = _config()
    topo = topology.topology("v5e-8")
    seen = []

    def fake_compile(c, t):  # remat none is fastest but does not fit; dots fits and beats full
        seen.append((c.remat, c.mesh.fsdp, c.frozen_weights))
        if c.mesh.tensor == 2:
            raise ValueError("a mesh the model refuses")
        step = {"none": 1.0, "dots": 2.0, "save_qkv": 2.5, "full": 3.0}[c.remat]
        return _report(step, total_bytes=200 if c.remat == "none" else 50)

    result = ls.search(config, topo, fake_compile, budget=50, log=lambda _: None)
    assert len(seen) == min(50, len(ls.candidates(config, 8, 1, topo.hbm_per_device(8))))
    ranked = [r for r in result["rows"] if "report" in r]
    assert ranked[0]["layout"].remat == "dots" and ranked[0]["report"]["fits"]
    steps = [r["report"]["performance"]["step_s"]["overlap"] for r in ranked if r["report"]["fits"]]
    assert steps == sorted(steps)
    assert any("error" in r for r in result["rows"])  # refused layouts are listed, not lost
    assert result["best"]["remat"] == "dots" and result["best"]["mesh.tensor"] == 1
    text = ls.format_search(result)
    assert text.splitlines()[-1].startswith("best: --config.mesh.data=") and "--config.remat=dots" in text
    json.dumps(ls.as_json(result))  # --output_json can write it


def test_a_tpu_program_with_windowed_einsums_is_compiled_again_without_them():
    """A TPU candidate whose program has collective-permutes is followed by the same layout with
    windowed_einsum off, inside the budget; a program without them, or a GPU target, is not."""
    config = _config()
    seen = []

    def fake_compile(c, t):  # fsdp layouts get windowed einsums; off, they are faster
        seen.append((c.mesh.fsdp, c.remat, c.frozen_weights, c.windowed_einsum))
        report = _report(1.0 if c.windowed_einsum else 0.5, total_bytes=50)
        report["collectives"] = {"collective-permute": {"count": 8 if c.mesh.fsdp > 1 and c.windowed_einsum else 0}}
        return report

    result = ls.search(config, topology.topology("v5e-8"), fake_compile, budget=6, log=lambda _: None)
    assert len(seen) == 6
    for i, (fsdp, remat, placement, windowed) in enumerate(seen):
        if not windowed:  # right after its parent, which had the permutes
            assert seen[i - 1] == (fsdp, remat, placement, True) and fsdp > 1
        elif fsdp > 1 and i + 1 < len(seen):
            assert seen[i + 1] == (fsdp, remat, placement, False)
    assert any(not w for *_, w in seen) and result["best"]["windowed_einsum"] is False
    seen.clear()
    ls.search(config, topology.topology("h100-8"), fake_compile, budget=4, log=lambda _: None)
    assert len(seen) == 4 and all(w for *_, w in seen)  # XLA:GPU has no such option


def test_extrapolation_is_linear_in_plain_layers_and_recomputes_ratios():
    small, large = _report(1.0, 10, layers=1), _report(1.5, 14, layers=2)
    full = ls.extrapolate(small, large, 1, 2, 30)
    assert full["performance"]["step_s"]["overlap"] == pytest.approx(1.5 + 0.5 * 28)
    assert full["per_device"]["total_bytes"] == 14 + 4 * 28
    assert full["fits"] is (14 + 4 * 28 <= 100) and full["headroom_bytes"] == 100 - (14 + 4 * 28)
    w = full["weight_gathers"]
    assert w["ratio"] == pytest.approx(w["compiled_bytes"] / w["minimum_bytes"])
    # MFU from the carried FLOPs and step time, not carried itself
    perf = full["performance"]
    assert perf["mfu"]["overlap"] == pytest.approx(full["model_flops_per_step"] / 2 / (perf["step_s"]["overlap"] * 1e3))
    # the bounds are the max / sum of the carried times: compute-bound cuts, a collective-bound stack
    small, large = (_report(0, 10, layers=n, times=t) for n, t in ((1, (1.0, 0.5, 0.2)), (2, (1.1, 0.6, 0.5))))
    perf = ls.extrapolate(small, large, 1, 2, 30)["performance"]
    assert perf["bound"] == "collectives" and perf["step_s"]["overlap"] == pytest.approx(0.5 + 0.3 * 28)
    assert perf["step_s"]["serial"] == pytest.approx(3.9 + 3.4 + 8.9)
    assert perf["step_s"]["roofline"] == pytest.approx(8.9)  # the op-by-op sum, 7.3, is under the collectives
    assert perf["parts"]["layers"]["share"] == pytest.approx(3.9 / 7.3) and perf["parts"]["layers"]["mxu_efficiency"] is None
    # the reduced configs keep the TTT layers, moved to the front
    cut = ls.reduced(_config("--config.model.num_layers=4", "--config.ttt.layers=1,3"), 2)
    assert cut.model.num_layers == 4 and cut.ttt.layers == "1,2"


@needs_libtpu
def test_search_compiles_for_a_tpu_topology(tmp_path, capsys):
    out = tmp_path / "search.json"
    code = compile_cli.main(SMALL + ["--topology=v5e:2x2", "--search", "--search_budget=2", f"--output_json={out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out.read_text())
    compiled = [r for r in report["rows"] if "report" in r]
    assert len(compiled) == 2 and all(r["report"]["performance"]["step_s"]["overlap"] > 0 for r in compiled)
    first = compiled[0]["report"]["performance"]["step_s"]["overlap"]
    assert all(first <= r["report"]["performance"]["step_s"]["overlap"] for r in compiled if r["report"]["fits"])
    assert report["best"] == {f"mesh.{k}" if k in ("data", "fsdp", "tensor") else k: v
                              for k, v in compiled[0]["layout"].items()} | {"mesh.dcn_data": 1}
    assert "best: --config.mesh.data=" in captured.out
    # the first layout's program has XLA's windowed einsums (collective-permutes, micro model on 4 chips):
    # the search compiled the same layout with them off next, and got plain all-gathers
    first, second = (r["layout"] for r in report["rows"])
    assert {**first, "windowed_einsum": True} == {**second, "windowed_einsum": True} and first != second
    permutes = {r["layout"]["windowed_einsum"]: r["report"]["collectives"]["collective-permute"]["count"]
                for r in report["rows"]}
    assert permutes[True] > 0 and permutes[False] == 0
    best = [f"--config.{k}={v}" for k, v in report["best"].items()]
    assert reader.load("configs/tiny.py", reader.split_config_args(SMALL + best)[1]).windowed_einsum \
        is report["best"]["windowed_einsum"]


@needs_libtpu
def test_search_layers_alone_extrapolates_the_configs_own_layout(tmp_path, capsys):
    """`--search_layers 3` without --search: the config's layout compiled with 2 and 3 plain layers and
    carried to the full stack of 5, against the full stack's own compile."""
    deep = SMALL + ["--config.model.num_layers=6", "--topology=v5e:2x2", "--no_eval"]
    cut, whole = tmp_path / "cut.json", tmp_path / "whole.json"
    assert compile_cli.main(deep + ["--search_layers=3", f"--output_json={cut}"]) == 0
    assert "extrapolated every figure below linearly from compiles with 2 and 3" in capsys.readouterr().out
    assert compile_cli.main(deep + [f"--output_json={whole}"]) == 0
    cut, whole = json.loads(cut.read_text()), json.loads(whole.read_text())
    assert cut["extrapolated_from_plain_layers"] == [2, 3] and cut["mesh"] == whole["mesh"]
    # model FLOPs are linear in the layers: the carried figure is the full stack's
    assert cut["model_flops_per_step"] == pytest.approx(whole["model_flops_per_step"], rel=1e-9)
    # the rest is not exactly linear (the compiler's buffer assignment, the TTT layer's position); on this
    # model the step time carries to 1e-15 and memory to 6% (2026-12-07): 5% and 10% leave room for XLA
    step, full_step = cut["performance"]["step_s"]["overlap"], whole["performance"]["step_s"]["overlap"]
    assert step == pytest.approx(full_step, rel=0.05)
    assert cut["per_device"]["total_bytes"] == pytest.approx(whole["per_device"]["total_bytes"], rel=0.10)
