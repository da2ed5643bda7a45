"""The diffusion maths, independent of any network: noise schedules (ᾱ_t, σ_t), the forward process
q(x_t | x_0), timestep plans for sampling, classifier-free guidance and the samplers of the reverse process.

A model enters only as a callable `model(x_t, t)`; nothing here imports a network.
"""
