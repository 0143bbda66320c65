"""``pipeline generate``: new images datasets made by a generator, spread over Ray actors.

* :mod:`pipeline.generate.distribute`: splits N images into shards, one Ray actor per share of the
  cluster (a GPU each when asked), each actor building its generator once and writing its shards
  as they finish; ``dataset.json`` records the provenance (method, network, weights file and its
  sha256, settings) and every row its ``seed``: any image can be made again.
* :mod:`pipeline.generate.class_visualisation`: images a classifier scores as a class
  (gradient ascent from noise, Simonyan et al.; Yosinski et al.'s regularisers);
* :mod:`pipeline.generate.texture`: images with a picture's texture (Gatys et al.);
* :mod:`pipeline.generate.samples`: samples of a trained generative model (VAE, PixelCNN, DCGAN);
* :mod:`pipeline.generate.interpolate`: latent walks of a VAE or a GAN, as a contact sheet (in process);
* :mod:`pipeline.generate.quality`: how good samples are, through a trained classifier (``pipeline
  eval-generative``; in process);
* :mod:`pipeline.generate.sheet`: small images on one picture.
"""
