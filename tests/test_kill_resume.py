"""Kill a real K-FAC training process with SIGKILL at random moments, restart it, and
check that it ends exactly where an uninterrupted run ends.

Every restart resumes from the newest checkpoint (``tfngd.checkpointing``); the
checkpoints, written every epoch, hold every variable of the model and of the
optimizer, and the run's data and random draws are indexed by the optimizer step.
So the final checkpoint of the killed-and-restarted run must equal, bit for bit,
the final checkpoint of the straight run: weights, EMA weights, timestep-sampler
history, K-FAC's factors, inverses, momentum, damping, step counters. (There is no
random-generator state to save: every draw is seeded by the step.) Kills land
anywhere, saves included; a save is atomic, so the newest checkpoint is always
usable.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from tfngd import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, STEPS_PER_EPOCH = 12, 4
ARGS = ["--dataset", "checkerboard", "--num-train", "512", "--batch-size", "32",
        "--hidden-units", "32", "--num-blocks", "1", "--num-timesteps", "50",
        "--optimizer", "kfac", "--learning-rate", "0.05", "--statistics-every", "2",
        "--inverse-every", "3", "--timestep-sampler", "loss_second_moment",
        "--epochs", str(EPOCHS), "--steps-per-epoch", str(STEPS_PER_EPOCH),
        "--warmup-steps", "2", "--sample-steps", "5", "--num-samples", "64",
        "--sample-every-epochs", "0", "--verbose", "0", "--no-export"]
# The trainer with TensorFlow's deterministic kernels (the same floats in every process).
LAUNCH = ("import sys, tensorflow as tf; tf.config.experimental.enable_op_determinism(); "
          "from trainers.train import main; sys.exit(main(sys.argv[1:]))")
KILLS = 3


def _start(run_dir):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, "-c", LAUNCH, *ARGS, "--run-dir", str(run_dir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _checkpoint_step(run_dir) -> int:
    try:
        info = checkpointing.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    except checkpointing.CheckpointError:
        return -1
    return 0 if info is None else info["step"]


def _final_state(run_dir) -> dict:
    info = checkpointing.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    state = {}
    with h5py.File(info["path"], "r") as f:
        f.visititems(lambda name, item: state.__setitem__(name, item[()])
                     if isinstance(item, h5py.Dataset) else None)
    return info, state


def test_sigkill_at_random_moments_then_resume_equals_the_straight_run(tmp_path):
    straight = tmp_path / "straight"
    process = _start(straight)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]

    killed = tmp_path / "killed"
    rng = random.Random(20261201)
    kill_steps = []
    for _ in range(KILLS):
        before = _checkpoint_step(killed)
        process = _start(killed)
        # Let it make progress (a new checkpoint), then kill it a random moment later.
        deadline = time.monotonic() + 300
        while (process.poll() is None and _checkpoint_step(killed) <= before
               and time.monotonic() < deadline):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        if process.poll() is not None:  # it finished first: nothing left to interrupt
            break
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
        process.stdout.close()
        process.stderr.close()
        kill_steps.append(_checkpoint_step(killed))
    assert len(kill_steps) >= 2, kill_steps  # at least two kills hit a run in progress
    assert all(0 < step < EPOCHS * STEPS_PER_EPOCH for step in kill_steps), kill_steps
    assert kill_steps == sorted(kill_steps)  # every restart resumed, none started over

    process = _start(killed)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "resuming" in out

    straight_info, want = _final_state(straight)
    killed_info, got = _final_state(killed)
    assert straight_info["step"] == killed_info["step"] == EPOCHS * STEPS_PER_EPOCH
    assert got.keys() == want.keys() and len(want) > 20
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    leftovers = [n for n in os.listdir(killed / "checkpoints") if n.startswith("tmp-")]
    assert not leftovers  # the last save removed what killed saves left behind
