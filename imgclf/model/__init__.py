"""The network: InceptionResNetV2 + head, augmentation layers, deployable formats."""
