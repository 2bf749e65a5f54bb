"""Plain helpers shared by the test packages (fixtures stay in the conftest files).

Importable as ``helpers``: ``tests/`` is on ``sys.path`` under pytest (``tests/conftest.py`` makes sure).
"""
