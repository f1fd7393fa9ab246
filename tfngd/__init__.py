"""tfngd: diffusion models in Keras 3, trained with natural gradient descent."""
