"""Data: decoding rules, finding/deduplicating/splitting images, manifests, the tf.data pipeline."""
