"""Triton kernels, one file per op, installed as `gpt2fast.kernels`.

Each file holds one op's kernel, its launcher and its backward; the `triton` backend of
`gpt2fast.ops` registers them. Importing this package never imports triton itself.
"""
