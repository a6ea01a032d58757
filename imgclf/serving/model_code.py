"""The model's code, logged with MLflow's models-from-code: no pickled Python object.

MLflow runs this file when loading the registered model; it only names the class that
serves images (imgclf/serving/pyfunc.py, shipped with the serving code through code_paths).
"""

from mlflow.models import set_model

from imgclf.serving.pyfunc import ImageClassifier

set_model(ImageClassifier())
