"""Stands in for scikit-learn in the processes of ft's own test scripts (`tests/helpers.py`).

Keras imports scikit-learn, where it is installed, for `keras.wrappers`; none
of ft's test scripts uses it, and the import costs every such process about
1.2 s of CPU on a 2-core machine. Keras takes this ImportError as scikit-learn
not being installed.
"""

raise ImportError("scikit-learn is hidden from ft's test scripts (tests/no_sklearn)")
