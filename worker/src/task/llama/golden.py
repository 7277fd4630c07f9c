"""Prints the expected values of `tests.rs` from the PyTorch model
(`paramserver.models.llama`): the loss and each tensor's gradient norm of a
2-layer decoder (dim 16, 2 heads, hidden 24) at weights and bytes given by the
integer formulas that `tests.rs` repeats. Run with Debian's python3-torch:

    target/python-venv/bin/python worker/src/task/llama/golden.py  # (the venv of docs/testing.md)
"""

import numpy as np
import torch

from paramserver.models import llama

config = llama.LlamaConfig(dim=16, layers=2, heads=2, hidden=24)
net = llama.Llama(config)
with torch.no_grad():
    for k, (name, p) in enumerate(net.named_parameters()):
        j = torch.arange(p.numel(), dtype=torch.float64)
        if p.dim() >= 2:
            values = ((j * 7919 + k * 104729) % 2001 - 1000) / 25000.0
        else:
            values = 1.0 + ((j + k) % 11 - 5) / 100.0
        p.copy_(values.reshape(p.shape).float())
tokens = torch.tensor([(i * 37 + 11) % 256 for i in range(2 * 13)]).reshape(2, 13)
loss = net.loss(tokens)
loss.backward()
print(f"const LOSS: f32 = {str(np.float32(loss.item()))};")  # the shortest f32 repr
print("const GRADIENT_NORMS: [(&str, f32); %d] = [" % len(list(net.parameters())))
for name, p in net.named_parameters():
    print(f'    ("{name}", {str(np.float32(p.grad.double().norm().item()))}),')
print("];")
