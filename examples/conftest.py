"""Example findings. They run on the bundled model everywhere, and on `gpt2` where its weights are cached."""
