"""Sampling: the step contract every sampler follows (`steps`), DiT's DDPM/DDIM (`diffusion`), SiT's
interpolants with their ODE and SDE samplers (`transport`), mediator schedules and the paper's adaptive rule
(`switching`), and `generate`, the one entry point of every sampler (`generation`).

Builds on `mediator_models.network` and `mediator_models.storage`; knows nothing of recording or of jobs.
"""
