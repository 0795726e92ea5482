"""The layer on torch alone (`pip install lstainnorm`): put it in front of any network and train both."""

import torch
from torch import nn

import lstainnorm

net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
tiles = torch.rand(8, 3, 64, 64)                                      # RGB in [0, 1], your tiles

template = lstainnorm.estimate_template(tiles, progress=False)        # start from your data's colours
norm = lstainnorm.LStainNorm(templates=template)                      # Lab + HSV + RGB, fused by attention
model = lstainnorm.with_stain_norm(net, norm)

groups = [{"params": net.parameters(), "lr": 1e-3}] + lstainnorm.norm_param_groups(norm)
opt = torch.optim.AdamW(groups)
loss = nn.functional.cross_entropy(model(tiles), torch.randint(0, 2, (8,)))
loss.backward()
opt.step()                                                            # the templates learn with the task
print(norm.template())                                                # what it learned, natural units
