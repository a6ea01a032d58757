"""The network: InceptionResNetV2 + head, its augmentation layers and calibration."""
