"""Latent diffusion on MNIST: autoencoder floor, sample quality and step time.

    python -m benchmarks.latent_mnist [--data-dir /work/shared/data/mnist] [--quick]

Trains both stages with :func:`trainers.train_latent.train` (run directory
``runs/bench_latent_mnist``, removed first unless ``--keep``), then measures on the
held-out split (MNIST here: the 10,000 test images, 8,000 train / 2,000 held out):

* the autoencoder's reconstruction MSE on the held-out images (posterior mean, images in
  [-1, 1]);
* Frechet distance and KID in the shipped MNIST feature classifier
  (:class:`tfngd.bench.sample_quality.SampleEvaluator`) against the held-out images, of
  (a) decoded samples of the latent model, (b) the autoencoder's reconstructions of the
  same training images the data floor uses (the autoencoder's floor) and (c) those
  training images themselves (the data floor), all with the same count;
* the training-step time of the latent U-Net and of a pixel-space U-Net (28x28x1, the same
  base width and blocks, ``channel_mults=(1, 2, 2)``, attention at 7x7) at the same batch
  size, measured back to back in this process.

Writes ``benchmarks/results/latent_mnist.json`` and ``docs/images/latent_mnist_samples.png``
/ ``latent_mnist_reconstructions.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

RESULTS = os.path.join("benchmarks", "results", "latent_mnist.json")
IMAGES = os.path.join("docs", "images")


def _step_time(model, batches, steps: int, warmup: int = 3) -> float:

    model.fit(batches, steps_per_epoch=warmup, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0)
    return (time.perf_counter() - started) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="/work/shared/data/mnist")
    parser.add_argument("--run-dir", default=os.path.join("runs", "bench_latent_mnist"))
    parser.add_argument("--keep", action="store_true", help="resume an existing run directory")
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny budgets)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--timing-steps", type=int, default=4)
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args(argv)

    import keras

    from tfngd import data, images
    from tfngd.bench.sample_quality import SampleEvaluator
    from tfngd.config import TrainConfig, build_diffusion
    from tfngd.model import DiffusionModel
    from tfngd.networks import build_unet
    from trainers import train_latent

    quick = args.quick
    ae_config = train_latent.AutoencoderConfig(
        latent_channels=4, base_channels=16, channel_mults=(1, 2, 2), beta=1e-3,
        learning_rate=2e-3, batch_size=64, epochs=2 if quick else 6,
        steps_per_epoch=5 if quick else 100)
    config = TrainConfig(
        dataset="mnist", data_dir=args.data_dir, optimizer="adam", learning_rate=1e-3,
        base_channels=64, channel_mults=(1,), num_res_blocks=2, attention_resolutions=(7,),
        batch_size=64, epochs=2 if quick else 12, steps_per_epoch=5 if quick else 100,
        warmup_steps=2 if quick else 100, ema_decay=0.999, schedule="cosine",
        num_timesteps=1000, prediction_type="eps", sample_steps=50, seed=0)
    if os.path.isdir(args.run_dir) and not args.keep:
        shutil.rmtree(args.run_dir)
    started = time.perf_counter()
    summary = train_latent.train(config, ae_config, args.run_dir, export_root=None,
                                 sample_every_epochs=0, verbose=2)
    total_train = time.perf_counter() - started
    model = summary.pop("model")
    autoencoder = model.autoencoder
    splits = data.load_dataset("mnist", data_dir=args.data_dir)

    num = min(args.num_samples, len(splits.eval))
    evaluator = SampleEvaluator("images", splits.eval, dataset="mnist", train=splits.train)
    started = time.perf_counter()
    chunk = 500
    samples = np.concatenate([
        np.asarray(model.sample(min(chunk, num - i), seed=1000 + i,
                                num_steps=args.sample_steps, sampler=args.sampler,
                                decode=True))
        for i in range(0, num, chunk)])
    sample_seconds = time.perf_counter() - started
    sample_metrics, skipped = evaluator(samples)
    floor_index = np.sort(np.random.default_rng(0).choice(len(splits.train), num,
                                                          replace=False))
    data_floor, _ = evaluator.data_floor(num, seed=0)  # the same draw as floor_index
    reconstructions = autoencoder.reconstruct(splits.train[floor_index])
    ae_floor, _ = evaluator(reconstructions)
    eval_recon = autoencoder.reconstruct(splits.eval)

    # Step time, latent vs pixel space, same batch size, back to back.
    batch = config.batch_size
    latents = model.autoencoder.encode(splits.train[:2048])
    keras.utils.set_random_seed(0)
    pixel = DiffusionModel(
        build_unet((28, 28, 1), base_channels=config.base_channels, channel_mults=(1, 2, 2),
                   num_res_blocks=config.num_res_blocks, attention_resolutions=(7,)),
        build_diffusion(config), ema_decay=config.ema_decay)
    pixel.compile(optimizer=keras.optimizers.Adam(1e-4, global_clipnorm=1.0))
    timing_latent = type(model)(
        build_unet(autoencoder.latent_shape, base_channels=config.base_channels,
                   channel_mults=config.channel_mults, num_res_blocks=config.num_res_blocks,
                   attention_resolutions=config.attention_resolutions),
        build_diffusion(config), autoencoder, ema_decay=config.ema_decay)
    timing_latent.compile(optimizer=keras.optimizers.Adam(1e-4, global_clipnorm=1.0))
    steps = 3 if quick else args.timing_steps
    latent_step = _step_time(timing_latent, data.training_batches(latents, batch, 0), steps)
    pixel_step = _step_time(pixel, data.training_batches(splits.train[:2048], batch, 0), steps)

    def params(network):
        return int(sum(np.prod(w.shape) for w in network.trainable_weights))

    os.makedirs(IMAGES, exist_ok=True)
    suffix = "_quick" if quick else ""
    samples_png = images.save_png(os.path.join(IMAGES, f"latent_mnist_samples{suffix}.png"),
                                  images.samples_to_image(samples[:64]))
    pairs = np.stack([splits.eval[:32], eval_recon[:32]], axis=1).reshape(64, 28, 28, 1)
    recon_png = images.save_png(
        os.path.join(IMAGES, f"latent_mnist_reconstructions{suffix}.png"),
        images.samples_to_image(pairs, ncols=16))
    result = {
        "command": "python -m benchmarks.latent_mnist" + (" --quick" if quick else "")
        + (" --keep" if args.keep else ""),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "note": "2 CPU cores shared with other jobs (contended)"},
        "data": {"dataset": "mnist", "data_dir": args.data_dir, "train": len(splits.train),
                 "eval": len(splits.eval)},
        "autoencoder": {"config": ae_config.to_dict(), **summary["autoencoder"],
                        "eval_reconstruction_mse": float(np.mean((eval_recon - splits.eval) ** 2)),
                        "reconstruction_psnr_db": float(
                            10 * np.log10(4.0 / np.mean((eval_recon - splits.eval) ** 2)))},
        "latent_model": {"config": {k: v for k, v in config.to_dict().items()},
                         "steps": summary["steps"], "train_seconds": summary["train_seconds"],
                         "encode_seconds": summary["encode_seconds"],
                         "final_val_loss": summary["final_val_loss"],
                         "num_parameters": params(model.denoiser)},
        "total_train_seconds": total_train,
        "sample_quality": {
            "num_samples": num, "reference": f"{len(splits.eval)} held-out images",
            "feature_space": "tfngd.feature_classifier mnist",
            "latent_samples": {**sample_metrics, "sampler": args.sampler,
                               "num_steps": args.sample_steps, "spacing": "leading",
                               "seconds": sample_seconds},
            "autoencoder_floor": ae_floor, "data_floor": data_floor, "skipped": skipped},
        "step_time": {"batch_size": batch, "timing_steps": steps,
                      "latent_seconds": latent_step, "pixel_seconds": pixel_step,
                      "pixel_over_latent": pixel_step / latent_step,
                      "latent_unet_parameters": params(timing_latent.denoiser),
                      "pixel_unet_parameters": params(pixel.denoiser),
                      "pixel_unet": {"image_shape": [28, 28, 1], "channel_mults": [1, 2, 2],
                                     "attention_resolutions": [7],
                                     "base_channels": config.base_channels,
                                     "num_res_blocks": config.num_res_blocks}},
        "images": {"samples": samples_png, "reconstructions": recon_png},
    }
    output = args.output if not quick else args.output.replace(".json", "_quick.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=2, default=float)
    print(json.dumps({k: result[k] for k in ("autoencoder", "sample_quality", "step_time",
                                             "total_train_seconds")}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
