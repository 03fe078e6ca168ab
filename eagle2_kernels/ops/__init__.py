"""Public ops: validate, pick a backend, dispatch. One module per op."""
