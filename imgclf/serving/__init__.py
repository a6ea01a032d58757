"""What the registered model carries into production: the pyfunc and the runners. Small, and
free of training imports (tracking/registration.py packs exactly this, with data/images.py)."""
