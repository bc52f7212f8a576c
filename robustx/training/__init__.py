"""Training objective: the input-gradient penalty (and its fused double backprop), adaptive psi, and the one loss of every method."""
