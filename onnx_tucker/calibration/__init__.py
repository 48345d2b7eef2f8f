"""The stages that fit on data: data-driven ranks (`rankselect`) and the refit of the factors to the
original model's activations (`calibrate`), both through `runtime.activations.ActivationCache`."""
