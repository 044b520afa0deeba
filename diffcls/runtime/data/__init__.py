"""Data in: inputs (paths, folders, globs, list files -> keys and labels), preprocessing, prompts, the on-disk embedding and latent caches. Imports nothing else of the runtime."""
