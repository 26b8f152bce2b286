"""Benchmarks and reference code, outside the installed `cars_jax` package; run from the
repository root.

  bench.py             loader / train-step / fused-epoch benchmarks (python benchmarks/bench.py)
  fused.py             whole epochs on the device: resident data + lax.scan (the fused benchmark)
  seed_torch.py        the seed notebook's PyTorch network, train step and loader (the baselines;
                       tests/test_interop.py checks the network against cars_jax.model)
  seed_torch_train.py  the seed notebook's PyTorch training loop on a cars_jax config
  gpu_recipes.sh       two recipes side by side on one GPU
"""
