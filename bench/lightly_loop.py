"""lightly's SimCLR loop, run by ``bench/train_loop.py`` inside its lightly virtualenv (not for direct use).

The recipe of lightly's SimCLR example: a DataLoader (2 workers) applying ``SimCLRTransform`` per image,
``NTXentLoss``, one forward per view. The model is raysys's (same backbone and head), which normalizes
its input itself, so the transform's normalization is off. Prints ``{"images_per_s": ...}`` over the
epochs after the first.
"""

import argparse
import json
import time

import numpy as np
import torch
from lightly.loss import NTXentLoss
from lightly.transforms import SimCLRTransform
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from raysys.models.backbones import ContrastiveModel


class Views(Dataset):
    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("images")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--small-stem", action="store_true")
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    transform = SimCLRTransform(input_size=args.image_size, normalize=None)
    loader = DataLoader(Views(np.load(args.images), transform), batch_size=args.batch_size, shuffle=True,
                        drop_last=True, num_workers=2, persistent_workers=True)
    model = ContrastiveModel(args.backbone, args.width, args.small_stem).train()
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    images, seconds = 0, 0.0
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for (x0, x1) in loader:
            loss = criterion(model(x0)[1], model(x1)[1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if epoch:
                images += len(x0)
        if epoch:
            seconds += time.perf_counter() - start
    print(json.dumps({"images_per_s": images / seconds}))


if __name__ == "__main__":
    main()
