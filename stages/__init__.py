"""The pipeline's stages, one module each: `python -m stages.<name>` (dvc.yaml).

A stage command runs in a child of the warm server when one is up (imgclf/warm.py: the
libraries every stage imports, imported once); IMGCLF_WARM=0 runs it here, as a plain
process.
"""

from imgclf.warm import hand_over

hand_over()
