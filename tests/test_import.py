"""``import neuralode`` stays light: no plotting library until ``neuralode.plotting`` is used.

Each check runs in a fresh interpreter, since this test session may have imported matplotlib
already.
"""

import subprocess
import sys
import textwrap


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_neuralode_imports_no_matplotlib():
    _run("""
        import sys
        import neuralode as node
        loaded = sorted(m for m in sys.modules if m.split(".")[0].startswith("matplotlib"))
        assert not loaded, f"import neuralode imported {loaded[:5]}"
        assert "neuralode.plotting" not in sys.modules
        assert "plotting" in node.__all__ and "plotting" in dir(node)
    """)


def test_plotting_loads_on_first_access():
    _run("""
        import sys
        import matplotlib
        matplotlib.use("Agg")
        import neuralode as node
        plotting = node.plotting
        assert sys.modules["neuralode.plotting"] is plotting
        for name in plotting.__all__:
            assert hasattr(plotting, name), name
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots()
        out = node.plotting.vector_field(ax, lambda t, z: -z, n=5)
        assert out is ax
        from neuralode import plotting as again
        import neuralode.plotting
        assert again is plotting is neuralode.plotting
    """)


def test_unknown_attribute_is_still_an_attribute_error():
    _run("""
        import neuralode as node
        try:
            node.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("expected AttributeError")
    """)
