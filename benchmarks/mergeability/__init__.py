"""Does the Merge Compatibility Index predict real merge outcomes?

A tiny Llama-style decoder is pretrained on some synthetic sequence tasks, fine-tuned per task, and every
cross-task pair of fine-tunes is merged with mergekit's methods; the merged models' accuracy is compared with
the MCI that `mergelens_mcp.compare_models` gives the same pair. See README.md in this folder.
"""
