"""imgclf: image classification by transfer learning with InceptionResNetV2, on DVC and MLflow."""
