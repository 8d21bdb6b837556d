"""Training on accelerate: the loop, its optimizer, checkpoints and step log."""
