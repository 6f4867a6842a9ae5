"""Training views drawn per image on batched tensors on the device (:mod:`.views`)."""
