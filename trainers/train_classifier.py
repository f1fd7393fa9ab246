"""Train and save the feature classifiers of the image metrics (Frechet distance, KID).

    python -m trainers.train_classifier --dataset digits mnist
    python -m trainers.train_classifier --dataset mnist --data-dir /work/shared/data/mnist

For each data set: trains :func:`tfngd.feature_classifier.train_classifier` on the
training split, measures the accuracy on the held-out evaluation split, and writes
``tfngd/assets/classifiers/<dataset>.keras`` plus ``<dataset>.json`` (test accuracy, this
exact command, versions). ``--output-dir`` writes elsewhere (e.g. for experiments).
The MNIST data directory defaults to ``../shared/data/mnist`` relative to the repository
(the offline IDX files).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MNIST_DIR = os.path.join(REPO_ROOT, "..", "shared", "data", "mnist")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", nargs="+", default=["digits", "mnist"],
                        choices=["digits", "mnist", "cifar10"])
    parser.add_argument("--data-dir", default=None,
                        help="data directory (MNIST IDX files; default for MNIST: "
                             "../shared/data/mnist relative to the repository)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: per data set, see feature_classifier)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None,
                        help="write <dataset>.keras/.json here instead of tfngd/assets/classifiers")
    parser.add_argument("--min-accuracy", type=float, default=None,
                        help="exit with status 1 if a test accuracy is below this (e.g. 0.98)")
    parser.add_argument("--verbose", type=int, default=0, choices=[0, 1, 2])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    from tfngd import feature_classifier as fc

    tf.config.experimental.enable_op_determinism()
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m trainers.train_classifier", *map(shlex.quote, raw_argv)])
    failed = []
    for dataset in args.dataset:
        data_dir = args.data_dir
        if data_dir is None and dataset == "mnist":
            data_dir = os.path.normpath(DEFAULT_MNIST_DIR)
        model, report = fc.train_classifier(dataset, data_dir=data_dir, epochs=args.epochs,
                                            seed=args.seed, verbose=args.verbose)
        path = fc.classifier_path(dataset)
        if args.output_dir is not None:
            path = os.path.join(args.output_dir, os.path.basename(path))
        model_path, json_path = fc.save_classifier(model, report, path=path, command=command)
        print(f"{dataset}: test accuracy {report['test_accuracy']:.4f} "
              f"({report['test_correct']}/{report['num_eval']} held-out images), "
              f"{report['params']} parameters, {report['train_seconds']} s; "
              f"wrote {model_path} and {json_path}", flush=True)
        if args.min_accuracy is not None and report["test_accuracy"] < args.min_accuracy:
            failed.append(dataset)
    if failed:
        print(f"below --min-accuracy {args.min_accuracy}: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
