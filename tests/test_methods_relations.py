"""The cross-rank gather of relation losses, simulated in one process."""

import torch

from logitcache.student.methods._relations import gather_batch, single_process_gradient


def test_one_process_gets_its_input_unchanged():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_batch(x, 1) is x
    loss = x.pow(2).sum()
    assert single_process_gradient(loss, 1) is loss


def _relation_loss(e):
    """A loss that couples every pair of rows, as SP or RKD do."""
    gram = e @ e.T
    return (gram - gram.mean()).pow(2).mean()


def test_gathered_ranks_average_to_the_single_process_gradient():
    torch.manual_seed(0)
    weight = torch.randn(3, 5)
    x = torch.randn(7, 3)  # a global batch split 4 + 3 over two ranks, as an epoch's last batch may be
    parts = [x[:4], x[4:]]
    single = torch.nn.Parameter(weight.clone())
    _relation_loss(x @ single).backward()

    grads, values = [], []
    for rank in range(2):
        w = torch.nn.Parameter(weight.clone())
        own = parts[rank] @ w
        everyone = [p @ weight for p in parts]  # what the other ranks send (detached by gather_batch)
        loss = single_process_gradient(_relation_loss(gather_batch(own, 2, rank=rank, all_gather=lambda _, parts=everyone: parts)), 2)
        loss.backward()
        grads.append(w.grad)
        values.append(loss.item())
    ddp_average = (grads[0] + grads[1]) / 2
    assert torch.allclose(ddp_average, single.grad, rtol=1e-5, atol=1e-7)
    assert values[0] == values[1] == _relation_loss(x @ weight).item()
