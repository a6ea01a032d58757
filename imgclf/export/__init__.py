"""The deployable files of a trained model (an adapter over the core): the SavedModel, the
TFLite copies, the Keras reference probabilities they are checked against."""
