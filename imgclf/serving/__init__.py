"""What the registered model carries into production: the pyfunc and the runners. Small, and
free of training imports (tracking/publish.py packs exactly this, with data/images.py)."""
