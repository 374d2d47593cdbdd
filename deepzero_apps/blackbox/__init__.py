"""The black-box layer: everything that touches a model we may only query.

    wrapper.py      BlackBoxClassifier: query-only calls, counted, timed, faults as one-line errors
    losses.py       losses computed on a black box's answers (denoiser losses, labels, image counting)
    loaders.py      classifier sources from config (train, run, callable, TorchScript, HTTP) -> a black box
    run_source.py   a classify run directory as a classifier ([0, 1] images in), and its export
    http_client.py  HTTPClassifier: the client of the .npy wire format (docs/blackbox.md)
    ledger.py       QueryLedger: the images a run paid a remote black box for, kept across kills

Import from here; the module split is internal. The reference server is the serve app
(deepzero_apps.tasks.serve).
"""

from .http_client import NPY, OUTPUT_HEADER, HTTPClassifier, decode, display_url, encode
from .ledger import QueryLedger
from .loaders import CLASSIFIER_KINDS, ClassifierConfig, black_box, describe, load_classifier
from .losses import DenoiserLoss, ImageQueries, WhiteBox, labels_of, stability
from .wrapper import OUTPUT_KINDS, BlackBoxClassifier, BlackBoxError, OutputKind

__all__ = [
    "BlackBoxClassifier", "BlackBoxError", "OutputKind", "OUTPUT_KINDS",
    "DenoiserLoss", "ImageQueries", "WhiteBox", "labels_of", "stability",
    "CLASSIFIER_KINDS", "ClassifierConfig", "black_box", "describe", "load_classifier",
    "HTTPClassifier", "NPY", "QueryLedger", "OUTPUT_HEADER", "decode", "display_url", "encode",
]
