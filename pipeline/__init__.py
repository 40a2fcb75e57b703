"""Training pipeline around the ``dinat`` model package: data, training, checkpoints, export."""
