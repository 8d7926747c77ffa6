"""What ``nanomoe.train_loop`` drives, one backend per framework: ``jax_backend.JaxBackend`` and
``torch_backend.TorchBackend``. They sit above ``conversion`` (``--init_from`` reads every format
it knows) and are imported one at a time, so a JAX run never imports torch."""
