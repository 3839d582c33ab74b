"""One module per op: reference, kernels, launchers, autograd, public function."""
