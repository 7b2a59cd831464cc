"""The foundation model: a self-supervised image encoder and an embedding-conditioned diffusion generator."""
