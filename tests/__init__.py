"""The test suite, a package so that bench/ can import its fixtures (`from tests.fixtures import ...`,
run from the repository root) with no sys.path edits."""
