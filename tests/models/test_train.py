"""The training loop: exact resume after an interruption, NaN stops with the step, settings are checked."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

from forethought.core.errors import ForethoughtError
from forethought.core.files import DIGESTS_FILE
from forethought.models.checkpoint import latest_checkpoint, list_checkpoints, load_training_state
from forethought.models.gpt2 import build_regression, regression_config
from forethought.models.tasks.synthetic import SyntheticTask
from forethought.models.train import TrainConfig, TrainingDiverged, train

TASK = SyntheticTask(p=1.0, n_terms=3, freq=3.0, seq_len=8)


def tiny_model():
    config = regression_config(in_dim=2, out_dim=1, n_layer=2, d_model=16, n_head=2, n_positions=8)
    return build_regression(config, seed=0)


def config(**overrides) -> TrainConfig:
    settings = dict(steps=12, batch_size=8, lr=3e-3, eval_every=4, checkpoint_every=5, progress=False)
    return TrainConfig(**{**settings, **overrides})


class Interrupted(Exception):
    pass


class FailingTask:
    """Wraps a task; raises (like a kill) when asked for batch number ``fail_at``, or returns NaN loss."""

    def __init__(self, task, fail_at: int, nan: bool = False):
        self.task, self.fail_at, self.nan, self.calls = task, fail_at, nan, 0

    def sample(self, batch_size, generator):
        self.calls += 1
        if self.calls == self.fail_at and not self.nan:
            raise Interrupted
        return self.task.sample(batch_size, generator)

    def loss(self, model, inputs, targets):
        loss = self.task.loss(model, inputs, targets)
        return loss * float("nan") if self.nan and self.calls == self.fail_at else loss


@pytest.mark.parametrize("myopic", [False, True])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, myopic):
    straight = train(tiny_model(), TASK, config(myopic=myopic), tmp_path / "straight")
    eval_batches = config().eval_batches
    with pytest.raises(Interrupted):  # dies while sampling step 8's batch, after the step-5 checkpoint
        train(tiny_model(), FailingTask(TASK, fail_at=eval_batches + 8), config(myopic=myopic), tmp_path / "resumed")
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000005"]
    resumed = train(tiny_model(), TASK, config(myopic=myopic), tmp_path / "resumed")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history == straight.history
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step-0000010", "step-0000012"]
    versions = load_training_state(resumed.checkpoint)["versions"]  # a checkpoint traces to the versions that made it
    assert {package: versions[package] for package in ("torch", "transformers", "transformer-lens")} == {
        package: metadata.version(package) for package in ("torch", "transformers", "transformer-lens")}


def test_myopic_and_vanilla_runs_differ(tmp_path):
    vanilla = train(tiny_model(), TASK, config(steps=3), tmp_path / "v").model
    myopic = train(tiny_model(), TASK, config(steps=3, myopic=True), tmp_path / "m").model
    assert any(not torch.equal(a, b) for a, b in zip(vanilla.parameters(), myopic.parameters()))


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    eval_batches = config().eval_batches
    task = FailingTask(TASK, fail_at=eval_batches + 7, nan=True)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7 .*step-0000005"):
        train(tiny_model(), task, config(), tmp_path)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-0000005"
    assert not list((tmp_path / "checkpoints").glob("*.tmp*"))
    resumed = train(tiny_model(), TASK, config(), tmp_path)  # the kept checkpoint still resumes
    assert resumed.history[-1]["step"] == 12


def test_resume_with_other_settings_is_refused(tmp_path):
    train(tiny_model(), TASK, config(steps=5), tmp_path)
    with pytest.raises(ForethoughtError, match=r"trained with other settings \(lr: 0.003 → 0.1"):
        train(tiny_model(), TASK, config(steps=5, lr=0.1), tmp_path)


def test_bad_config_is_named():
    with pytest.raises(ForethoughtError, match="unknown myopic cut 'x'"):
        TrainConfig(myopic_cut="x")


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_a_run_folder_never_runs(tmp_path):
    train(tiny_model(), TASK, config(steps=5), tmp_path / "run")
    state_file = latest_checkpoint(tmp_path / "run") / "training_state.pt"
    marker = tmp_path / "payload-ran"
    torch.save({"step": 5, "config": {}, "payload": Payload(marker)}, state_file)
    with pytest.raises(ForethoughtError, match="training_state.pt was changed or damaged after it was written"):
        train(tiny_model(), TASK, config(steps=8), tmp_path / "run")  # its digest, first
    (state_file.parent / DIGESTS_FILE).unlink()  # a planter who also removes the digests meets weights_only
    with pytest.raises(ForethoughtError, match="cannot read .*training_state.pt .*not a training state"):
        train(tiny_model(), TASK, config(steps=8), tmp_path / "run")
    assert not marker.exists()


def test_truncated_weights_without_digests_are_named_on_resume(tmp_path):
    """A checkpoint from before digests were recorded, its weights truncated since: one line, not a traceback."""
    train(tiny_model(), TASK, config(), tmp_path / "run")
    checkpoint = latest_checkpoint(tmp_path / "run")
    (checkpoint / DIGESTS_FILE).unlink()
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ForethoughtError, match=rf"the weights in .*{checkpoint.name} cannot be read \(damaged"):
        train(tiny_model(), TASK, config(), tmp_path / "run")


class NanGradientTask:
    """A finite loss whose gradient is NaN (√x at 0, times 0): the weights go NaN while the loss looks fine."""

    def sample(self, batch_size, generator):
        return TASK.sample(batch_size, generator)

    def loss(self, model, inputs, targets):
        first = next(model.parameters())
        return TASK.loss(model, inputs, targets) + torch.sqrt(0 * first.sum())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    with pytest.raises(ForethoughtError, match=r"not saving step 1 .* holds NaN or infinite weights"):
        train(tiny_model(), NanGradientTask(), config(checkpoint_every=1, grad_clip=0.0), tmp_path)
    assert latest_checkpoint(tmp_path) is None
    assert not list((tmp_path / "checkpoints").glob("*"))


def test_a_second_process_cannot_write_a_run_folder_being_trained(tmp_path, monkeypatch):
    import forethought.core.files

    train(tiny_model(), TASK, config(steps=5), tmp_path)
    monkeypatch.setattr(forethought.core.files.fcntl, "flock", lambda *args: (_ for _ in ()).throw(BlockingIOError()))
    (tmp_path / forethought.core.files.LOCK_FILE).write_text("pid 4242 on host since now (forethought train)")
    with pytest.raises(ForethoughtError, match=r"is being written by pid 4242 on host .*; wait for it"):
        train(tiny_model(), TASK, config(steps=8), tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000005"]
