"""The toy world of two clusters ("cats" and "dogs") in the plane, where everything about diffusion can be
computed exactly: the data, its noised marginals, the ideal denoiser; a small MLP that learns it; pictures of
the reverse process landing on one mode or the other; and how fast each sampler converges.

    mixture      GaussianMixture, its forward marginals and its exact denoiser (ExactModel)
    mlp          a small denoiser MLP trained on the CPU in seconds
    figures      the pictures (PNG)
    convergence  sampler error against the number of model evaluations
    command      `kedavra demo` and `kedavra convergence`
"""
