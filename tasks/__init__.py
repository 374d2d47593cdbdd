"""The applications, one package each; `deepzero_apps.apps` finds every `APP` declared here.

    classify/   image classification trained with ZO (CGE / RGE, dense or sparse) or FO
    certify/    a denoiser in front of a query-only classifier, certified by randomized smoothing
    pde/        Solver-in-the-Loop correction trained through a black-box solver
    serve/      a local classifier served over HTTP (the reference remote black box)
"""
