"""Inputs: the datasets (hub, image folder, the generated sample set), their transforms and
captions, and the encoders and latent cache that turn them into training inputs."""
