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

    publisher, receiver = make_publisher(name, torch.float32), make_receiver(name)
    assert publisher.capabilities is CAPABILITIES[name] is capabilities(name)
    assert WeightHandle(name, 0, None).capabilities is CAPABILITIES[name]
    for method in ("connect", "publish", "stats"):
        assert callable(getattr(publisher, method))
    for method in ("fetch", "apply"):
        assert callable(getattr(receiver, method))


def test_the_capabilities_are_what_each_transport_does():
    """The object store keeps a publication loadable while its handle lives (lazy loads, an evaluation of an older
    step); a broadcast round reaches the group named at publication, once."""
    assert (capabilities("object_store").lazy, capabilities("object_store").membership) == (True, False)
    assert (capabilities("broadcast").lazy, capabilities("broadcast").membership) == (False, True)
    with pytest.raises(ValueError, match="cluster.weight_transport: 'carrier_pigeon'"):
        capabilities("carrier_pigeon")
