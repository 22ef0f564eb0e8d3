"""The DCGAN's builders and losses: the tutorial's architecture, to the parameter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from components import models


def test_default_generator_is_the_tutorials():
    generator = models.build_generator()
    assert generator.input_shape == (None, 100)
    assert generator.output_shape == (None, 28, 28, 1)
    # The tutorial's model.summary(): 2,330,944 parameters, 25,472 of them BatchNorm's
    # moving statistics (not trainable).
    assert generator.count_params() == 2_330_944
    trainable = sum(int(np.prod(v.shape)) for v in generator.trainable_variables)
    assert trainable == 2_305_472
    kinds = [type(layer).__name__ for layer in generator.layers[1:]]
    assert kinds == [
        "Dense", "BatchNormalization", "LeakyReLU", "Reshape",
        "Conv2DTranspose", "BatchNormalization", "LeakyReLU",
        "Conv2DTranspose", "BatchNormalization", "LeakyReLU",
        "Conv2DTranspose",
    ]  # fmt: skip
    convs = [layer for layer in generator.layers if isinstance(layer, layers.Conv2DTranspose)]
    assert [(c.filters, c.kernel_size, c.strides) for c in convs] == [
        (128, (5, 5), (1, 1)), (64, (5, 5), (2, 2)), (1, (5, 5), (2, 2)),
    ]  # fmt: skip
    assert convs[-1].activation.__name__ == "tanh"
    assert not any(getattr(layer, "use_bias", False) for layer in generator.layers)


def test_default_discriminator_is_the_tutorials():
    discriminator = models.build_discriminator()
    assert discriminator.input_shape == (None, 28, 28, 1)
    assert discriminator.output_shape == (None, 1)
    assert discriminator.count_params() == 212_865
    kinds = [type(layer).__name__ for layer in discriminator.layers[1:]]
    assert kinds == [
        "Conv2D", "LeakyReLU", "Dropout", "Conv2D", "LeakyReLU", "Dropout", "Flatten", "Dense",
    ]  # fmt: skip
    drops = [layer.rate for layer in discriminator.layers if isinstance(layer, layers.Dropout)]
    assert drops == [0.3, 0.3]


def test_widths_and_latent_size_come_from_the_arguments():
    generator = models.build_generator(latent_dim=16, width=32)
    assert generator.input_shape == (None, 16)
    assert generator.output_shape == (None, 28, 28, 1)
    # Dense 16 -> 7*7*32 (no bias), BN 4*32, ConvT 32->16, BN 4*16, ConvT 16->8, BN 4*8,
    # ConvT 8->1, all 5x5 without bias.
    expected = 16 * 49 * 32 + 4 * 49 * 32 + 25 * 32 * 16 + 4 * 16 + 25 * 16 * 8 + 4 * 8 + 25 * 8
    assert generator.count_params() == expected
    discriminator = models.build_discriminator(width=8, dropout=0.1)
    # Conv 1->8 (+bias), Conv 8->16 (+bias), Dense 7*7*16 -> 1 (+bias).
    assert discriminator.count_params() == (25 * 8 + 8) + (25 * 8 * 16 + 16) + (49 * 16 + 1)
    images = generator(tf.random.normal([3, 16]), training=False)
    assert images.shape == (3, 28, 28, 1)
    assert float(tf.reduce_min(images)) >= -1 and float(tf.reduce_max(images)) <= 1
    assert discriminator(images, training=False).shape == (3, 1)


def test_a_width_that_cannot_be_halved_twice_is_refused():
    with pytest.raises(AssertionError, match="multiple of 4"):
        models.build_generator(width=30)


def test_losses_on_known_logits():
    undecided = tf.zeros([4, 1])
    # At logit 0, D says 1/2: each cross-entropy term is ln 2.
    np.testing.assert_allclose(models.generator_loss(undecided), [math.log(2)] * 4, rtol=1e-6)
    np.testing.assert_allclose(
        models.discriminator_loss(undecided, undecided), [2 * math.log(2)] * 4, rtol=1e-6
    )
    confident_real, confident_fake = tf.fill([2, 1], 20.0), tf.fill([2, 1], -20.0)
    # A discriminator that is right costs it nothing; a fooled one costs the generator nothing.
    np.testing.assert_allclose(
        models.discriminator_loss(confident_real, confident_fake), [0, 0], atol=1e-6
    )
    np.testing.assert_allclose(models.generator_loss(confident_real), [0, 0], atol=1e-6)
    assert float(models.generator_loss(confident_fake)[0]) == pytest.approx(20, abs=1e-3)
