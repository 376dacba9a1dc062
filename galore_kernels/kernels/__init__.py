"""Triton kernels: one file per fused kernel, each with its @triton.jit kernels and its launcher.

Importing this package imports Triton; nothing here touches optimizer classes or state dicts.
"""
