"""raysys: Ray-distributed contrastive self-supervised learning on planetary images."""

__version__ = "0.1.0"


def load_encoder(path):
    """The pretrained encoder (a ``torch.nn.Module``) and its preprocessing from a run folder or an exported
    file (:func:`raysys.models.export.load_encoder`): ``encoder(preprocess(images))`` gives the features of uint8
    or float tensors, numpy arrays, PIL images or image paths at any size. Imported on first use so
    ``import raysys`` stays light."""
    from raysys.models.export import load_encoder as load

    return load(path)
