"""Integrations with training frameworks, one module each, imported explicitly.

Nothing is imported here, so ``import galore_kernels`` never pulls in a framework: use
``from galore_kernels.integrations.transformers import create_optimizer`` for Hugging Face ``Trainer``.
"""
