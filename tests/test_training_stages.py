"""The training stages, declared once (model/training_stages.py): what a launch may run, and the
argument list a launch gives each module, read back by the module as the config it was made from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.distributed import Launch, join, rendezvous_file
from model.dpo import DPOConfig, DPORun
from model.finetune import FinetuneConfig, FinetuneRun
from model.train import OptimConfig, RunConfig, TrainConfig
from model.training_stages import CONFIG_FILE, PREFERENCE_TUNING, PRETRAINING, TRAINING_MODULES, TRAINING_STAGES, FINETUNING

REPO = Path(__file__).resolve().parents[1]
ACROSS_NODES = RunConfig(devices=2, nodes=2, rdzv_endpoint="127.0.0.1:29400", rdzv_id="job-1", timeout_s=30)


def test_a_launch_runs_a_declared_training_stage_and_nothing_else():
    assert TRAINING_MODULES == ("model.train", "model.finetune", "model.dpo")
    for stage in TRAINING_STAGES:
        command = Launch(stage.module, ("--out", "run"), devices=2).command()
        assert command[-4:] == ["-m", stage.module, "--out", "run"]
        # The module torchrun runs reads its arguments with this same declaration.
        source = (REPO / (stage.module.replace(".", "/") + ".py")).read_text()
        assert f'if __name__ == "__main__":\n    from model.training_stages import training_stage\n\n    training_stage("{stage.module}").main()\n' in source
    for module in ("model.sft", "os", "model.train "):
        with pytest.raises(ValueError, match=rf"a launch runs one of \('model.train', 'model.finetune', 'model.dpo'\), not '{module}'"):
            Launch(module, (), devices=2).command()


def test_a_join_refuses_an_announced_module_that_is_no_training_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDLM_STORE", str(tmp_path))
    shared = rendezvous_file("job-1")
    shared.parent.mkdir(parents=True)
    shared.write_text(json.dumps({"module": "http.server", "args": ["8000"], "devices": 1, "nodes": 2, "rdzv_endpoint": "127.0.0.1:29400", "created": 0}))
    with pytest.raises(ValueError, match="a launch runs one of .*, not 'http.server'"):
        join("job-1", timeout_s=5, log=lambda line: None)


@pytest.mark.parametrize("stage, config, folders", [
    (PRETRAINING, TrainConfig.of(preset="small", context_length=64, max_steps=7, lr=1e-3, seed=5, devices=2, compile=True), {"shards": Path("/data/shards/k1")}),
    (FINETUNING, FinetuneRun(FinetuneConfig(method="full", lora_targets=("q", "v"), max_length=256), OptimConfig(max_steps=3, lr=2e-5, min_lr=0), ACROSS_NODES),
     {"base": Path("/data/pretrain/k2"), "data": [Path("/data/trainset/k3"), Path("/data/qa/k4")]}),
    (PREFERENCE_TUNING, DPORun(FinetuneConfig(grad_accum=2), DPOConfig(beta=0.3, rejected="model"), OptimConfig(batch_size=2), RunConfig(devices=3, dtype="fp32")),
     {"base": Path("/data/finetune/k5"), "data": [Path("/data/trainset/k6")], "held_out": [Path("/data/qa/k7"), Path("/data/qa/k8")]}),
    (PREFERENCE_TUNING, DPORun(), {"base": Path("/data/finetune/k5"), "data": [Path("/data/trainset/k6")], "held_out": []}),
], ids=["pretrain", "finetune", "dpo", "dpo-nothing-held-out"])
def test_a_config_becomes_the_argument_list_and_back(stage, config, folders, tmp_path):
    run = tmp_path / "run"
    arguments = stage.arguments(config, run, folders)
    assert arguments[:2] == ("--config", str(run / CONFIG_FILE)) and arguments[-2:] == ("--out", str(run))
    assert stage.parse(list(arguments)) == (config, folders, run)
    # The command line's options override the file's, in the section they name.
    overridden = stage.parse([*arguments, "--optim.max-steps", "11", "--run.keep-last", "4"])[0]
    assert (overridden.optim.max_steps, overridden.run.keep_last) == (11, 4) and overridden.optim.lr == config.optim.lr


def test_a_stage_refuses_another_stages_config_and_a_file_of_unknown_sections(tmp_path):
    with pytest.raises(TypeError, match="model.dpo trains with a DPORun, not a FinetuneRun"):
        PREFERENCE_TUNING.arguments(FinetuneRun(), tmp_path, {"base": tmp_path, "data": [tmp_path], "held_out": []})
    (tmp_path / "config.json").write_text(json.dumps({"finetune": {}, "dpo": {"beta": 0.2}}))
    with pytest.raises(SystemExit, match=r"unknown section\(s\) \['dpo'\]; model.finetune reads \['finetune', 'optim', 'run'\]"):
        FINETUNING.parse(["--config", str(tmp_path / "config.json"), "--base", "b", "--data", "d", "--out", "o"])
