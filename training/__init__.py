"""Training side of tsimcne: data readers, augmentations, network, loss and the staged trainer (torch)."""
