from hsmocsp.health import READY, Health, State, worst


def test_worst_picks_the_worse_state_and_joins_its_reasons() -> None:
    a = Health(State.DEGRADED, "Vault unreachable")
    b = Health(State.FAILED, "token gone")
    c = Health(State.FAILED, "certificate expired")
    assert worst(READY, a) == a
    assert worst(a, b, READY, c) == Health(State.FAILED, "token gone; certificate expired")
    assert worst() == READY
    assert worst(b, b) == b


def test_labels_are_what_readyz_prints() -> None:
    assert [s.label for s in State] == ["ready", "degraded", "failed"]
    assert READY.ready and not Health(State.DEGRADED, "x").ready
