"""Every registered quantiser and prior kind gives what its protocol promises, in shapes and values."""

from __future__ import annotations

import inspect

import pytest
import torch

from progvq.kinds import PRIORS, QUANTIZERS
from progvq.protocols import Prior, Quantizer
from progvq.quantize import QuantizerOutput


def _members(protocol: type) -> set[str]:
    names = set(getattr(protocol, "__annotations__", {}))
    return names | {n for n, v in vars(protocol).items() if inspect.isfunction(v) and not n.startswith("_")}


@pytest.mark.parametrize("kind", QUANTIZERS.kinds())
def test_each_quantiser_kind_keeps_the_protocol(kind: str) -> None:
    torch.manual_seed(0)
    quantizer = QUANTIZERS.build(QUANTIZERS.entry(kind).config())
    assert all(hasattr(quantizer, name) for name in _members(Quantizer))
    k, d = quantizer.num_codes, quantizer.dim
    assert isinstance(k, int) and isinstance(d, int) and k >= 2
    z = torch.randn(2, d, 3, 5)
    assert isinstance(quantizer(z), QuantizerOutput)  # a training pass (it may set up its state)
    quantizer.eval()
    out = quantizer(z)
    assert out.quantized.shape == z.shape and out.indices.shape == (2, 3, 5)
    codes = quantizer.nearest(z)
    assert codes.dtype == torch.int64 and codes.shape == (2, 3, 5)
    assert int(codes.min()) >= 0 and int(codes.max()) < k
    assert torch.equal(out.indices, codes)
    # the vectors of the codes are what the pass hands on (straight through: the same values)
    torch.testing.assert_close(quantizer.lookup(codes), out.quantized)


@pytest.mark.parametrize("classes", [0, 3])
@pytest.mark.parametrize("kind", PRIORS.kinds())
def test_each_prior_kind_keeps_the_protocol(kind: str, classes: int) -> None:
    torch.manual_seed(0)
    prior = PRIORS.build(PRIORS.entry(kind).config(), 5, classes).eval()
    assert all(hasattr(prior, name) for name in _members(Prior))
    assert (prior.num_codes, prior.num_classes) == (5, classes)
    codes = torch.randint(0, 5, (4, 3, 3), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0]) if classes else None
    per_position = prior.log_prob_per_position(codes, labels)
    assert per_position.shape == (4, 3, 3) and bool((per_position <= 0).all())
    torch.testing.assert_close(prior.log_prob(codes, labels), per_position.flatten(1).sum(1))
    assert prior.log_prob(codes).shape == (4,)  # without labels: the marginal of a conditional prior
    mask = torch.zeros(4, 3, 3, dtype=torch.bool)
    mask[:, 0] = True
    drawn = prior.sample(4, 3, 3, generator=torch.Generator().manual_seed(2), label=labels, known=(codes, mask))
    assert drawn.dtype == torch.int64 and drawn.shape == (4, 3, 3)
    assert torch.equal(drawn[mask], codes[mask])
    # the protocol's keyword arguments are the kind's
    wanted = inspect.signature(Prior.sample).parameters
    offered = inspect.signature(type(prior).sample).parameters
    assert all(name in offered and offered[name].kind == p.kind for name, p in wanted.items())
