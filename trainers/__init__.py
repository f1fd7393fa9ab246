"""Command-line entry points: tfngd-train, tfngd-sample, tfngd-export."""
