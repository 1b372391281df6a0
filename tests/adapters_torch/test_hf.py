"""Hugging Face transformers: save_pretrained round trips of reduced models, the Trainer callback.

Tiny configs built from scratch (no download), CPU only.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Mamba2Config,
    Mamba2ForCausalLM,
    Mamba2Model,
    MambaConfig,
    MambaForCausalLM,
    MambaModel,
)

from compressm_torch import CompreSSM, state_sizes  # noqa: E402
from compressm_torch.hf import (  # noqa: E402
    CompreSSMTrainerCallback,
    align_state_sizes,
    load_reduced_pretrained,
    prepare_resume,
    record_state_sizes,
)

L0, L1 = "backbone.layers.0.mixer", "backbone.layers.1.mixer"


def hf_mamba(seed=0):
    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, state_size=16)
    return MambaForCausalLM(cfg)


def hf_mamba2(seed=0):
    torch.manual_seed(seed)
    cfg = Mamba2Config(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        state_size=16,
        num_heads=4,
        head_dim=8,
        n_groups=2,
        expand=2,
        chunk_size=8,
    )
    return Mamba2ForCausalLM(cfg)


def tokens(seed=0, shape=(4, 12)):
    return torch.randint(0, 32, shape, generator=torch.Generator().manual_seed(seed))


def reduce_first_layer(model):
    """The controller's scheduled reduction (``reduce()``) of the first mixer only, so the two
    layers end at different sizes."""
    ctl = CompreSSM(
        model,
        None,
        total_steps=10,
        mode="fixed",
        fraction=0.5,
        layers=[L0],
        calibration_batches=[tokens(1)],
    )
    (event,) = ctl.reduce()
    ctl.remove_hooks()
    assert event.status == "reduced"
    return state_sizes(model)


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


# --- save_pretrained -> load_reduced_pretrained ------------------------------------------------


@pytest.mark.parametrize(
    ("make", "base"),
    [(hf_mamba, MambaModel), (hf_mamba2, Mamba2Model)],
    ids=["mamba", "mamba2"],
)
def test_reduced_model_round_trips_through_save_pretrained(make, base, tmp_path):
    model = make()
    cls = type(model)
    sizes = reduce_first_layer(model)
    assert sizes == {L0: 8, L1: 16}
    assert record_state_sizes(model) == sizes
    assert model.config.compressm_state_sizes == sizes
    assert model.config.state_size == 16  # the layers disagree: the config keeps its own
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded safetensors
    assert list(tmp_path.glob("*.safetensors.index.json"))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["compressm_state_sizes"] == sizes
    # a plain from_pretrained cannot rebuild it: the config holds one state size
    with pytest.raises(RuntimeError, match="mismatch"):
        cls.from_pretrained(tmp_path)
    again = load_reduced_pretrained(cls, tmp_path)
    assert type(again) is cls
    assert state_sizes(again) == sizes
    ids = tokens(2)
    assert torch.equal(logits(again, ids), logits(model, ids))
    mixer = again.get_submodule(L0)
    assert mixer.ssm_state_size == 8
    if hasattr(mixer, "conv_dim"):  # Mamba-2: per group, two groups, B and C channels
        assert mixer.conv_dim == mixer.intermediate_size + 2 * 2 * 8
    # the base model loads from the same folder: the names lose the head's prefix
    trunk = load_reduced_pretrained(base, tmp_path)
    assert state_sizes(trunk) == {"layers.0.mixer": 8, "layers.1.mixer": 16}


def test_aligned_sizes_load_with_a_plain_from_pretrained(tmp_path):
    model = hf_mamba()
    reduce_first_layer(model)
    ids = tokens(3)
    before = logits(model, ids)
    assert align_state_sizes(model) == {L0: 16, L1: 16}  # padded to the largest
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)
    assert model.config.state_size == 16
    model.save_pretrained(tmp_path)
    again = MambaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_uniform_sizes_set_the_config_state_size(tmp_path):
    model = hf_mamba2()
    ctl = CompreSSM(
        model, None, total_steps=10, mode="fixed", fraction=0.5, calibration_batches=[tokens(1)]
    )
    ctl.reduce()
    ctl.remove_hooks()
    record_state_sizes(model)
    assert model.config.state_size == 8
    model.save_pretrained(tmp_path)
    again = Mamba2ForCausalLM.from_pretrained(tmp_path)  # no loader needed
    ids = tokens(2)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_loader_names_the_path_when_sizes_are_not_recorded(tmp_path):
    model = hf_mamba()
    sizes = reduce_first_layer(model)
    model.save_pretrained(tmp_path)  # without record_state_sizes
    with pytest.raises(ValueError, match=re.escape(repr(str(tmp_path)))) as info:
        load_reduced_pretrained(MambaForCausalLM, tmp_path)
    assert "compressm_state_sizes" in str(info.value)
    assert "state_size=16" in str(info.value)
    # the sizes can be given instead
    again = load_reduced_pretrained(MambaForCausalLM, tmp_path, state_sizes=sizes)
    assert state_sizes(again) == sizes
    with pytest.raises(TypeError, match="`cls` must be a transformers PreTrainedModel"):
        load_reduced_pretrained(torch.nn.Linear, tmp_path)


def test_prepare_resume_reads_the_sizes_of_a_folder(tmp_path):
    model = hf_mamba()
    sizes = reduce_first_layer(model)
    record_state_sizes(model)
    model.save_pretrained(tmp_path)
    fresh = hf_mamba(seed=1)
    assert prepare_resume(fresh, tmp_path) == sizes
    assert state_sizes(fresh) == sizes
    assert fresh.config.compressm_state_sizes == sizes
    with pytest.raises(FileNotFoundError, match="records no state sizes"):
        prepare_resume(fresh, tmp_path / "missing")


def test_callback_checks_its_options():
    with pytest.raises(TypeError, match=r"Unknown CompreSSM options \['tua'\]"):
        CompreSSMTrainerCallback(tua=0.1)
    with pytest.raises(ValueError, match="`tau`"):
        CompreSSMTrainerCallback(tau=2.0)
    with pytest.raises(ValueError, match="`importance`"):
        CompreSSMTrainerCallback(importance="nope")
    with pytest.raises(ValueError, match="`monitor` must name an evaluation metric"):
        CompreSSMTrainerCallback(mode="pragmatic")
    with pytest.raises(RuntimeError, match="on_train_begin"):
        _ = CompreSSMTrainerCallback().controller


# --- transformers.Trainer ----------------------------------------------------------------------


def trainer_for(model, out, callbacks, *, steps=12, extra=None, **args):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": ids, "labels": ids} for ids in tokens(7, (48, 10))]
    defaults = {
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    arguments = TrainingArguments(str(out), **{**defaults, **args})
    return Trainer(
        model=model, args=arguments, train_dataset=data, callbacks=callbacks, **(extra or {})
    )


OPTIONS = {"mode": "fixed", "fraction": 0.5, "reduction_steps": [4], "calibration_steps": 2}


@pytest.mark.filterwarnings("ignore::compressm_core.ReductionWarning")  # cuts before learning
def test_trainer_callback_reduces_and_records_the_sizes(tmp_path):
    model = hf_mamba()
    # rewarmup_steps hooks the optimizer's step: the optimizer inside accelerate's wrapper
    callback = CompreSSMTrainerCallback(**OPTIONS, rewarmup_steps=2)
    trainer = trainer_for(model, tmp_path, [callback], logging_strategy="steps", logging_steps=1)
    trainer.train()
    assert trainer.state.global_step == 12
    assert callback.controller.num_steps == 12
    reduced = [e for e in callback.history if e.status == "reduced"]
    assert [(e.step, e.old_rank, e.new_rank) for e in reduced] == [(4, 16, 8), (4, 16, 8)]
    assert all(e.loss is not None for e in reduced)  # the logged loss reached the controller
    assert state_sizes(model) == {L0: 8, L1: 8}
    assert model.config.compressm_state_sizes == {L0: 8, L1: 8}
    assert model.config.state_size == 8
    optimizer = trainer.optimizer
    for p in model.parameters():
        for value in optimizer.state[p].values():
            assert value.ndim == 0 or value.shape == p.shape


def test_trainer_resumes_a_reduced_checkpoint_into_a_fresh_model(tmp_path):
    first = CompreSSMTrainerCallback(**OPTIONS)
    trainer = trainer_for(hf_mamba(), tmp_path, [first], save_strategy="steps", save_steps=6)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-6"
    assert (checkpoint / "compressm.pt").is_file()
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["compressm_state_sizes"] == {L0: 8, L1: 8}
    full = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # 1. the Trainer resizes the fresh model itself (the callback's load hooks) and finds the
    #    controller state in its output_dir
    fresh = hf_mamba(seed=3)
    second = CompreSSMTrainerCallback(**OPTIONS)
    trainer = trainer_for(fresh, tmp_path, [second], save_strategy="no")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert state_sizes(fresh) == {L0: 8, L1: 8}
    assert second.controller.num_steps == 12
    assert [e.step for e in second.history if e.status == "reduced"] == [4, 4]
    for name, p in fresh.named_parameters():
        state = trainer.optimizer.state[p]
        assert state["exp_avg"].shape == p.shape
        assert int(state["step"]) == 12
        torch.testing.assert_close(p, full[name], rtol=1e-5, atol=1e-6)

    # 2. a checkpoint elsewhere, a callback added after the Trainer was built
    moved = tmp_path / "elsewhere"
    shutil.copytree(checkpoint, moved)
    fresh = hf_mamba(seed=4)
    third = CompreSSMTrainerCallback(**OPTIONS)
    trainer = trainer_for(fresh, tmp_path / "other", [])
    trainer.add_callback(third)
    assert third.prepare_resume(fresh, moved) == {L0: 8, L1: 8}
    trainer.train(resume_from_checkpoint=str(moved))
    assert third.controller.num_steps == 12
    assert state_sizes(fresh) == {L0: 8, L1: 8}


def test_trainer_callback_hands_the_monitored_metric_to_a_pragmatic_controller(tmp_path):
    calls = []

    def falling_score(prediction):
        calls.append(1)
        return {"score": -float(len(calls))}  # every evaluation is worse than the one before

    callback = CompreSSMTrainerCallback(
        monitor="eval_score",
        mode="pragmatic",
        rollback_rtol=0.0,
        fraction=0.5,
        reduction_steps=[4],
        calibration_steps=2,
    )
    model = hf_mamba()
    evaluation = {"eval_dataset": [{"input_ids": x, "labels": x} for x in tokens(9)]}
    evaluation["compute_metrics"] = falling_score
    trainer = trainer_for(
        model, tmp_path, [callback], steps=6, extra=evaluation, eval_strategy="steps", eval_steps=2
    )
    trainer.train()
    statuses = [(e.step, e.status) for e in callback.history]
    # reduced at step 4, judged by the evaluation after it (delivered at step 5): rolled back
    assert statuses == [(4, "reduced"), (4, "reduced"), (5, "rolled_back"), (5, "rolled_back")]
    assert state_sizes(model) == {L0: 16, L1: 16}
    assert model.config.compressm_state_sizes == {L0: 16, L1: 16}
    callback.monitor = "eval_nope"
    with pytest.raises(KeyError, match="`monitor='eval_nope'` is not among"):
        callback.on_evaluate(trainer.args, trainer.state, trainer.control, metrics={"eval_x": 1})
