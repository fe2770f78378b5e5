"""The docs match the code: every public function and module is in the README's API table with its real
signature, and has a docstring."""

import inspect
import os
import re

import fusedloss

README = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
API = README[README.index("## API"):README.index("### Replacing")]


def public_functions():
    return {n: getattr(fusedloss, n) for n in fusedloss.__all__ if inspect.isfunction(getattr(fusedloss, n))}


def test_every_public_function_is_documented_with_its_signature():
    for name, fn in public_functions().items():
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} has no real docstring"
        assert re.search(rf"\b{name}\b", API), f"{name} missing from the README's API section"
        written = re.search(rf"`{name}\(([^`]*)\)`", API)
        if written:  # a full signature in the table must be the real one, defaults included
            real = str(inspect.signature(fn))[1:-1].replace("'", '"')
            assert written.group(1) == real, f"README signature of {name}: ({written.group(1)}) != ({real})"


def test_every_module_is_documented():
    for name in fusedloss.nn.__all__:
        cls = getattr(fusedloss.nn, name)
        assert cls.__doc__, f"fusedloss.nn.{name} has no docstring"
        assert f"`{name}`" in API, f"fusedloss.nn.{name} missing from the README's API table"
