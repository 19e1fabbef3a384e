"""WeightPacker / unpack: the packed form in which the learner publishes weights to the generators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfleet.transport.packed import ALIGN, PackedWeights, WeightPacker, unpack


def tied_state() -> dict[str, torch.Tensor]:
    """A state dict shaped like a tied-embedding LM: lm_head.weight is the embedding's storage."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 3, generator=gen)
    return {
        "model.embed_tokens.weight": emb,
        "model.layers.0.mlp.weight": torch.randn(5, 3, generator=gen),
        "model.norm.weight": torch.randn(3, generator=gen),
        "scale": torch.tensor(2.5),  # 0-dim
        "lm_head.weight": emb,
    }


def test_round_trip_is_exact_and_tied_tensors_are_stored_once():
    state = tied_state()
    packed = WeightPacker(torch.float32).pack(state)
    out = unpack(packed)
    assert list(out) == list(state)
    for name, t in state.items():
        assert out[name].dtype == torch.float32 and out[name].shape == t.shape
        assert torch.equal(out[name], t)
    assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()
    # unique tensors: 21 + 15 + 3 + 1 floats, each rounded up to ALIGN bytes
    expected = sum(-(-4 * n // ALIGN) * ALIGN for n in (21, 15, 3, 1))
    assert packed.nbytes == expected
    assert all(s.offset % ALIGN == 0 for s in packed.slots)


def test_pack_casts_to_the_compute_dtype_as_torch_would():
    state = tied_state()
    out = unpack(WeightPacker(torch.bfloat16).pack(state))
    for name, t in state.items():
        assert out[name].dtype == torch.bfloat16
        assert torch.equal(out[name], t.to(torch.bfloat16))


def test_the_buffer_is_reused_and_a_packed_result_aliases_it():
    """Later packs write the same buffer (no new allocation per publication), so a caller must put or copy a result
    before packing again: the earlier result shows the new values."""
    state = tied_state()
    packer = WeightPacker(torch.float32)
    first = packer.pack(state)
    snapshot = first.buffer.copy()
    state["model.norm.weight"].add_(1.0)
    second = packer.pack(state)
    assert second.buffer is first.buffer
    assert torch.equal(unpack(first)["model.norm.weight"], state["model.norm.weight"])
    assert not np.array_equal(snapshot, second.buffer)


def test_a_changed_structure_is_refused():
    packer = WeightPacker(torch.float32)
    state = tied_state()
    packer.pack(state)
    state.pop("scale")
    with pytest.raises(ValueError, match="names changed"):
        packer.pack(state)


@pytest.mark.ray
def test_through_the_object_store_the_generator_side_gets_a_read_only_view(ray_cluster):
    """ray.put copies the packed buffer once; ray.get gives back a read-only numpy view of shared memory (Ray's
    out-of-band numpy path, no tensor pickling) and the unpacked tensors equal the originals."""
    ray = ray_cluster
    state = tied_state()
    ref = ray.put(WeightPacker(torch.float32).pack(state))

    @ray.remote(num_cpus=0)
    def read(packed: PackedWeights) -> tuple[bool, dict[str, torch.Tensor]]:
        tensors = unpack(packed)
        return packed.buffer.flags.writeable, {n: t.clone() for n, t in tensors.items()}

    writeable, out = ray.get(read.remote(ref), timeout=60)
    assert writeable is False
    assert all(torch.equal(out[n], state[n]) for n in state)


def test_a_handle_names_the_generators_it_reached():
    """The broadcast transport's handle lists the weight-group members (``<actor>@<incarnation>``) that hold its
    version; the pool sends requests only to those. The object store's reaches every generator."""
    from rlfleet.transport import WeightHandle

    handle = WeightHandle("broadcast", 3, None, members=frozenset({"rlfleet-generator-0@0"}))
    assert handle.reaches("rlfleet-generator-0@0")
    assert not handle.reaches("rlfleet-generator-0@1")  # restarted since: a new process, not in the group yet
    assert not handle.reaches("rlfleet-generator-1@0")
    assert WeightHandle("object_store", 3, None).reaches("rlfleet-generator-7@2")
