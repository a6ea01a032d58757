"""Training: the two phases, best-epoch tracking, resume, tf.distribute, one whole run."""
