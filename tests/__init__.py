"""The test suite: a package, so test modules import their shared helpers plainly (``from tests.helpers import ...``)."""
