"""The DCGAN: generator and discriminator builders, and the losses.

The defaults are exactly the architecture of TensorFlow's DCGAN tutorial
(tensorflow.org/tutorials/generative/dcgan); `latent_dim` and the two widths come from
params. Images are [28, 28, 1] in [-1, 1], matching the generator's `tanh`. Shapes are
asserted as each model is built, so a width or latent size that cannot produce a 28x28
image fails here, not in the middle of training.

The code version of this file is part of the training fingerprint (components/train.py):
a change here makes old checkpoints unusable, and training starts fresh.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from components.ingest import IMAGE_SHAPE

# The generator starts from a 7x7 map and doubles it twice: 7 -> 14 -> 28.
BASE_SIZE = IMAGE_SHAPE[0] // 4
assert BASE_SIZE * 4 == IMAGE_SHAPE[0] == IMAGE_SHAPE[1], IMAGE_SHAPE

_bce = keras.losses.BinaryCrossentropy(from_logits=True, reduction="none")


def _check(tensor, expected: tuple, where: str) -> None:
    # Keras symbolic shapes have None for the batch axis.
    assert tuple(tensor.shape[1:]) == expected, f"{where}: {tuple(tensor.shape)} != {expected}"


def build_generator(latent_dim: int = 100, width: int = 256) -> keras.Model:
    """z [B, latent_dim] -> image [B, 28, 28, 1] in [-1, 1].

    Tutorial: Dense 7*7*256 (no bias) -> BN -> LeakyReLU -> reshape -> ConvT 128 5x5 s1 ->
    BN -> LeakyReLU -> ConvT 64 5x5 s2 -> BN -> LeakyReLU -> ConvT 1 5x5 s2 tanh; `width`
    is the first map's channels (256), halved by each ConvT.
    """
    assert width % 4 == 0 and width >= 4, f"generator width must be a multiple of 4: {width}"
    z = keras.Input(shape=(latent_dim,), name="z")
    x = layers.Dense(BASE_SIZE * BASE_SIZE * width, use_bias=False)(z)
    x = layers.LeakyReLU()(layers.BatchNormalization()(x))
    x = layers.Reshape((BASE_SIZE, BASE_SIZE, width))(x)
    _check(x, (7, 7, width), "generator base map")
    x = layers.Conv2DTranspose(width // 2, 5, strides=1, padding="same", use_bias=False)(x)
    x = layers.LeakyReLU()(layers.BatchNormalization()(x))
    _check(x, (7, 7, width // 2), "generator block 1")
    x = layers.Conv2DTranspose(width // 4, 5, strides=2, padding="same", use_bias=False)(x)
    x = layers.LeakyReLU()(layers.BatchNormalization()(x))
    _check(x, (14, 14, width // 4), "generator block 2")
    # float32 output whatever the mixed-precision policy: tanh's range and the loss need it.
    image = layers.Conv2DTranspose(
        IMAGE_SHAPE[-1], 5, strides=2, padding="same", use_bias=False, activation="tanh",
        dtype="float32",
    )(x)  # fmt: skip
    _check(image, IMAGE_SHAPE, "generator output")
    return keras.Model(z, image, name="generator")


def build_discriminator(width: int = 64, dropout: float = 0.3) -> keras.Model:
    """image [B, 28, 28, 1] -> one logit [B, 1] (real > 0 > fake).

    Tutorial: Conv 64 5x5 s2 -> LeakyReLU -> Dropout 0.3 -> Conv 128 5x5 s2 -> LeakyReLU ->
    Dropout 0.3 -> Flatten -> Dense 1; `width` is the first conv's channels (64), doubled.
    """
    image = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = layers.Conv2D(width, 5, strides=2, padding="same")(image)
    x = layers.Dropout(dropout)(layers.LeakyReLU()(x))
    _check(x, (14, 14, width), "discriminator block 1")
    x = layers.Conv2D(width * 2, 5, strides=2, padding="same")(x)
    x = layers.Dropout(dropout)(layers.LeakyReLU()(x))
    _check(x, (7, 7, width * 2), "discriminator block 2")
    logit = layers.Dense(1, dtype="float32")(layers.Flatten()(x))
    _check(logit, (1,), "discriminator output")
    return keras.Model(image, logit, name="discriminator")


def generator_loss(fake_logits: tf.Tensor) -> tf.Tensor:
    """Non-saturating loss, per example [B]: the generator wants D to call its images real."""
    return _bce(tf.ones_like(fake_logits), fake_logits)


def discriminator_loss(real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tf.Tensor:
    """Per example [B]: real images should score real, generated ones fake."""
    return _bce(tf.ones_like(real_logits), real_logits) + _bce(
        tf.zeros_like(fake_logits), fake_logits
    )
