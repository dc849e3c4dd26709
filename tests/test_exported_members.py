import sdcn_p2p


def test_all_lists_exactly_the_public_names() -> None:
    for name in sdcn_p2p.__all__:  # the package loads its exports on first use
        getattr(sdcn_p2p, name)
    exported = set(sdcn_p2p.__all__)
    public = {name for name in vars(sdcn_p2p) if not name.startswith("_")}
    submodules = {name for name in public if type(getattr(sdcn_p2p, name)).__name__ == "module"}
    assert exported == (public - submodules) | {"__version__"}


def test_every_exported_name_resolves() -> None:
    for name in sdcn_p2p.__all__:
        assert getattr(sdcn_p2p, name) is not None
