"""retina_tf: retinal fundus vessel and artery/vein segmentation with Keras 3."""

__version__ = "0.1.0"
