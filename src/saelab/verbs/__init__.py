"""Verbs that join the parts (store -> coder -> metrics); the CLI is a thin layer over them."""
