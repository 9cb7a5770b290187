"""The mini model: a small SD 1.x-layout text-to-image model trained here on procedural images.

`data` makes the captioned images (and the ideal translation of a pair), `train` trains the
model, `sample` draws images from captions, `shipped` materialises the weights that ship with
the package as a normal diffusers folder.
"""
