"""The weight transport is one contract: each transport declares its capabilities, and no call site outside
``rlfleet/transport/`` asks which transport it holds (issue 31: the seam leaked through name checks and hasattr)."""

import ast
from pathlib import Path

import pytest

from rlfleet.transport import CAPABILITIES, TRANSPORTS, WeightHandle, capabilities, make_publisher, make_receiver

PACKAGE = Path(__file__).resolve().parents[1] / "rlfleet"


def name_checks(source: str) -> list[str]:
    """Comparisons with a transport's name (``x.transport == "object_store"``, ``... != "broadcast"``) and
    ``hasattr`` probes of a publisher or receiver."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            if any(name in TRANSPORTS for name in names):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr":
            target = ast.unparse(node.args[0])
            if "publisher" in target or "receiver" in target:
                found.append(ast.unparse(node))
    return found


def test_no_call_site_asks_which_transport_it_holds():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        # config (config.py, or its config_*.py sections) validates the user's choice by name
        if rel.startswith("transport/") or rel == "config.py" or rel.startswith("config_"):
            continue
        if found := name_checks(path.read_text()):
            offenders[rel] = found
    assert offenders == {}


def test_the_check_can_fail():
    assert name_checks('lazy = weights.transport == "object_store"\n') == ["weights.transport == 'object_store'"]
    assert name_checks('if hasattr(self.publisher, "connect"): pass\n') == ["hasattr(self.publisher, 'connect')"]
    assert name_checks("lazy = weights.capabilities.lazy\n") == []


@pytest.mark.parametrize("name", TRANSPORTS)
def test_each_transport_declares_its_capabilities_and_the_whole_contract(name):
    import torch

    loads = []  # colocated: the engine's load in the learner's process (the others have no use for it)
    publisher = make_publisher(name, torch.float32, load=lambda *args: loads.append(args))
    receiver = make_receiver(name)
    assert publisher.capabilities is CAPABILITIES[name] is capabilities(name)
    assert WeightHandle(name, 0, None).capabilities is CAPABILITIES[name]
    for method in ("connect", "publish", "stats"):
        assert callable(getattr(publisher, method))
    for method in ("fetch", "apply", "join", "receive"):
        assert callable(getattr(receiver, method))


def test_the_capabilities_are_what_each_transport_does():
    """The object store keeps a publication loadable while its handle lives (lazy loads, an evaluation of an older
    step); a broadcast round reaches the group named at publication, once."""
    assert (capabilities("object_store").lazy, capabilities("object_store").membership) == (True, False)
    assert (capabilities("broadcast").lazy, capabilities("broadcast").membership) == (False, True)
    assert (capabilities("colocated").lazy, capabilities("colocated").membership) == (False, False)
    with pytest.raises(ValueError, match="cluster.weight_transport: 'carrier_pigeon'"):
        capabilities("carrier_pigeon")


# ---------------------------------------------------------------------------------------------------------------
# What a receiver calls on the engine is declared, and the receive state is the receiver's
# ---------------------------------------------------------------------------------------------------------------

def declared(protocol) -> set[str]:
    """The members a protocol class declares (its own and its bases'), without the ``Protocol`` machinery."""
    from typing import Protocol

    names = set()
    for cls in protocol.__mro__:
        if cls in (Protocol, object) or cls.__module__ == "typing":
            continue
        names |= {n for n in vars(cls) if not n.startswith("_")}
    return names


def engine_calls(path: Path) -> dict[str, set[str]]:
    """For each class of ``path``: the attributes it reads from a name or parameter called ``engine``."""
    calls = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef):
            calls[node.name] = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                                and isinstance(n.value, ast.Name) and n.value.id == "engine"}
    return calls


def test_every_engine_call_of_a_receiver_is_declared_by_the_loader_protocols():
    """Issue 31: ``BroadcastReceiver.apply`` called ``engine.apply_received``, which the loader protocol did not
    declare. The object store's receiver calls only :class:`WeightLoader`; the broadcast's only
    :class:`GroupWeightLoader` (vLLM's weight-transfer API and ``between_requests``)."""
    from rlfleet.transport import GroupWeightLoader, WeightLoader

    transport = PACKAGE / "transport"
    store = engine_calls(transport / "object_store.py")["ObjectStoreReceiver"]
    broadcast = engine_calls(transport / "broadcast.py")["BroadcastReceiver"]
    assert store and store <= declared(WeightLoader)
    assert broadcast and broadcast <= declared(GroupWeightLoader)
    assert "apply_received" not in declared(GroupWeightLoader)
    assert {"load_weights", "version"} == declared(WeightLoader)


def test_the_check_of_engine_calls_can_fail(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("class R:\n    def apply(self, handle, engine):\n        engine.apply_received(handle.version)\n")
    assert engine_calls(module) == {"R": {"apply_received"}}


@pytest.mark.parametrize("cls", ["rlfleet.generation.engine.Engine", "rlfleet.generation.continuous.ContinuousEngine"])
def test_both_engines_implement_the_whole_loader_contract_with_its_signatures(cls):
    """Every member of :class:`GroupWeightLoader` exists on the batched and the continuous engine, methods with the
    protocol's parameters (the engines are not started: their classes are inspected)."""
    import importlib
    import inspect

    from rlfleet.transport import GroupWeightLoader

    module, name = cls.rsplit(".", 1)
    engine = getattr(importlib.import_module(module), name)
    for member in declared(GroupWeightLoader):
        ours, theirs = getattr(engine, member, None), getattr(GroupWeightLoader, member)
        assert ours is not None, f"{name} lacks {member}"
        if isinstance(theirs, property):
            assert isinstance(ours, property), member
        else:
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters), member


class RecordingLoader:
    """A :class:`GroupWeightLoader` that records the calls a receiver makes; ``finish_weight_update`` "loads" the
    round staged last."""

    def __init__(self):
        self.version, self.calls, self.model = 0, [], None
        self.stage = None

    def load_weights(self, state_dict, version, contents=None):
        self.calls.append(("load_weights", version))
        self.version = version

    def join_weight_group(self, init_info):
        self.calls.append(("join", init_info))

    def start_weight_update(self):
        self.calls.append(("start",))

    def receive_weights(self, update_info):
        self.calls.append(("receive", update_info))
        self.stage = update_info

    def finish_weight_update(self, version):
        self.calls.append(("finish", version))
        self.model = self.stage

    def between_requests(self, load):
        loaded = load()
        if loaded is not None:
            self.version = loaded
        return self.version


def test_the_broadcast_receiver_keeps_the_receive_state_and_loads_the_newest_round():
    """Two rounds before a request boundary open vLLM's round once and stage twice; the load at the boundary is the
    newer one (version 3 for a handle of version 2), once; a handle with nothing newer loads nothing; the handshake
    names a version never received; the next round opens a new vLLM round."""
    receiver, engine = make_receiver("broadcast"), RecordingLoader()
    receiver.join({"rank_offset": 1}, engine)
    receiver.receive({"round": 2}, 2, engine)
    receiver.receive({"round": 3}, 3, engine)
    assert (receiver.staged, receiver.round_open, engine.version) == (3, True, 0)  # staged, not loaded
    assert receiver.apply(WeightHandle("broadcast", 2, None), engine) == 3
    assert engine.calls == [("join", {"rank_offset": 1}), ("start",), ("receive", {"round": 2}),
                            ("receive", {"round": 3}), ("finish", 3)]
    assert (receiver.staged, receiver.round_open, engine.model) == (None, False, {"round": 3})
    assert receiver.apply(WeightHandle("broadcast", 3, None), engine) == 3 and engine.calls[-1] == ("finish", 3)
    with pytest.raises(RuntimeError, match="holds version 3 and received no round of version 4"):
        receiver.apply(WeightHandle("broadcast", 4, None), engine)
    receiver.receive({"round": 4}, 4, engine)
    assert engine.calls[-2:] == [("start",), ("receive", {"round": 4})]
    assert receiver.apply(WeightHandle("broadcast", 4, None), engine) == 4


def test_the_object_store_receiver_pushes_nothing_and_says_so():
    receiver = make_receiver("object_store")
    with pytest.raises(RuntimeError, match="'object_store' has no weight-transfer group"):
        receiver.join({}, RecordingLoader())
    with pytest.raises(RuntimeError, match="'object_store' pushes no rounds"):
        receiver.receive({}, 1, RecordingLoader())


# ---------------------------------------------------------------------------------------------------------------
# A LoRA adapter is a kind of contents the contract carries
# ---------------------------------------------------------------------------------------------------------------

def test_a_publication_says_whether_it_carries_full_weights_or_an_adapter_with_its_config():
    from rlfleet.config import LoraConfig
    from rlfleet.lora import adapter_config
    from rlfleet.transport import FULL, published_contents

    assert published_contents(None) is FULL and FULL.kind == "full" and FULL.adapter_config is None
    lora = LoraConfig(r=4)
    adapter = published_contents(lora)
    assert adapter.kind == "adapter" and adapter.adapter_config == adapter_config(lora)
    assert WeightHandle("object_store", 1, None).contents is FULL


def test_a_transport_that_cannot_carry_an_adapter_refuses_it_at_construction():
    import torch

    from rlfleet.config import LoraConfig
    from rlfleet.transport import published_contents

    adapter = published_contents(LoraConfig(r=4))
    assert [n for n in TRANSPORTS if capabilities(n).adapters] == ["object_store", "colocated"]
    with pytest.raises(ValueError, match="'broadcast' carries full weights only.*use one that carries adapters: "
                                         r"\['object_store'\]"):
        make_publisher("broadcast", torch.float32, contents=adapter)
    assert make_publisher("object_store", torch.float32, contents=adapter).contents is adapter


def test_a_colocated_publication_is_loaded_before_its_handle_exists_and_the_handle_carries_only_the_version():
    """The colocated publisher loads the learner's own tensors (the same objects, no copy) into the engine, then
    returns a handle without payload; the receiver has nothing to load and refuses an engine older than the
    handle (a publication is never skipped), and ``make_publisher`` refuses the transport without an engine."""
    import torch

    from rlfleet.config import LoraConfig
    from rlfleet.transport import published_contents

    class Engine:
        version = 0

        def load_weights(self, state_dict, version, contents):
            self.loaded, self.version, self.contents = state_dict, version, contents

    engine, state = Engine(), {"w": torch.ones(2)}
    adapter = published_contents(LoraConfig(r=4))
    publisher = make_publisher("colocated", None, contents=adapter, load=engine.load_weights)
    handle = publisher.publish(state, 3)
    assert engine.loaded is state and (engine.version, engine.contents) == (3, adapter)
    assert (handle.transport, handle.version, handle.payload, handle.contents) == ("colocated", 3, None, adapter)
    receiver = make_receiver("colocated")
    assert receiver.apply(handle, engine) == 3
    engine.version = 2
    with pytest.raises(RuntimeError, match="serves version 2, older than the publication's 3"):
        receiver.apply(handle, engine)
    with pytest.raises(ValueError, match="colocated transport loads into an engine .*pass load"):
        make_publisher("colocated", torch.float32)


def test_the_broadcast_handle_carries_the_publishers_contents():
    """A publication to an empty group makes no collective: the handle alone."""
    import torch

    publisher = make_publisher("broadcast", torch.float32)
    handle = publisher.publish({"w": torch.zeros(2)}, version=5)
    assert (handle.version, handle.members, handle.contents.kind) == (5, frozenset(), "full")


# ---------------------------------------------------------------------------------------------------------------
# One meaning per name (issue 31, deliverable 5)
# ---------------------------------------------------------------------------------------------------------------

def definitions(name: str) -> dict[str, list[str]]:
    """``module:Class`` -> the parameters of its method ``name``, for every class of the package defining it."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == name:
                        found[f"{path.relative_to(PACKAGE).as_posix()}:{node.name}"] = [a.arg for a in item.args.args]
    return found


def test_update_weights_means_loading_a_publication_or_is_vllms_client_protocol():
    """``update_weights`` had three signatures (the engine's state dict, the actor's handle, the broadcast client's
    round). Now the actors' (a generation actor's, the colocated actor's) load a publication by its handle; the only
    other is vLLM's ``VLLMWeightSyncClient`` method, whose name vLLM's trainer engines call; the engines load a
    state dict with ``load_weights``."""
    assert definitions("update_weights") == {"generation/actor.py:GenerationActor": ["self", "handle"],
                                             "cluster/colocated.py:ColocatedActor": ["self", "handle"],
                                             "transport/broadcast.py:GeneratorsClient": ["self", "update_info"]}
    loads = definitions("load_weights")
    assert loads["generation/engine.py:Engine"] == loads["generation/continuous.py:ContinuousEngine"] == [
        "self", "state_dict", "version", "contents"]
